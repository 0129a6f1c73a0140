"""ShmBroadcast: one writer (the TP leader), N readers (its followers), through a shared-memory
file on the same host. Replaces a gloo broadcast per step: a gloo round trip over loopback TCP
costs tens to hundreds of microseconds and wakes the follower through the kernel; here the
follower is already spinning on a sequence number and sees the step in about a microsecond.

Layout of the mapped file (int64 words):
    [0]                 seq: number of messages published so far
    [1]                 nbytes of the newest message
    [8 * (1 + r)]       ack of reader r (r = 0 .. readers - 1): the seq it has copied out,
                        each on its own 64-byte line so readers never share one
    [DATA_OFFSET ...]   the message bytes (one message at a time)

Protocol: the writer waits until every reader acked the previous message, copies the new one
in, then bumps `seq`. A reader polls `seq`, copies the message out, then writes its ack. A
message larger than the data region goes as several parts (the caller's framing knows the
total size).

Hazards:
- Ordering relies on the host's store ordering (x86-64 TSO: the bytes land before `seq`) and
  on each store being one aligned 8-byte write (numpy scalar assignment). Other architectures
  would need explicit fences: the group falls back to gloo off x86-64.
- A reader that dies never acks: the writer's wait is bounded (`timeout_s`) and aborts early
  when `abort_all()` is called (the TP watchdog does when it sees a dead follower).
- Readers poll: for `SPIN_S` after each message they spin, yielding the core each turn
  (`sched_yield`: free when the host has idle cores, and no theft from a model computing on the
  CPU), then sleep in growing steps up to `IDLE_SLEEP_S`, so an idle group costs little CPU
  and the first step after a pause waits at most that long.
- The file is unlinked as soon as every reader has mapped it, so a crash leaks nothing.
"""

from __future__ import annotations

import mmap
import os
import platform
import tempfile
import threading
import time
import uuid
import weakref

import numpy as np

LINE = 64  # bytes: one cache line per counter
SPIN_S = 0.05  # hot polling after a message; the next step usually arrives well within it
IDLE_SLEEP_S = 0.001

_LIVE: weakref.WeakSet[ShmBroadcast] = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()


_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


class ChannelAborted(RuntimeError):
    pass


def supported() -> bool:
    """Shared-memory broadcast is used only where its ordering argument holds (x86-64)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def _shm_dir() -> str:
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else tempfile.gettempdir()
    )


def abort_all() -> None:
    """Make every waiting writer and reader in this process raise ChannelAborted."""
    with _LIVE_LOCK:
        channels = list(_LIVE)
    for channel in channels:
        channel.abort()


class ShmBroadcast:
    def __init__(
        self, path: str, readers: int, data_bytes: int, reader: int | None, create: bool
    ) -> None:
        self.path = path
        self.readers = readers
        self.reader = reader  # None: the writer
        self.data_offset = LINE * (1 + readers)
        size = self.data_offset + data_bytes
        if create:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.ftruncate(fd, size)
        else:
            fd = os.open(path, os.O_RDWR)
            size = os.fstat(fd).st_size
        try:
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.data_bytes = size - self.data_offset
        self._words = np.frombuffer(self._mm, dtype=np.int64, count=self.data_offset // 8)
        self._data = np.frombuffer(
            self._mm, dtype=np.uint8, count=self.data_bytes, offset=self.data_offset
        )
        self._seen = int(self._words[0]) if reader is not None else 0
        self._aborted = False
        with _LIVE_LOCK:
            _LIVE.add(self)

    @classmethod
    def create(cls, readers: int, data_bytes: int) -> ShmBroadcast:
        path = os.path.join(_shm_dir(), f"tandem-step-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        return cls(path, readers, data_bytes, reader=None, create=True)

    @classmethod
    def attach(cls, path: str, readers: int, reader: int) -> ShmBroadcast:
        return cls(path, readers, 0, reader=reader, create=False)

    def unlink(self) -> None:
        """Remove the file name (mappings stay valid); the writer calls it once readers attached."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def abort(self) -> None:
        self._aborted = True

    def close(self) -> None:
        self._aborted = True
        with _LIVE_LOCK:
            _LIVE.discard(self)
        del self._words, self._data
        try:
            self._mm.close()
        except BufferError:  # a view still exported; the mapping goes with the process
            pass

    # ---------------------------------------------------------------- writer

    def send(self, message: np.ndarray, timeout_s: float) -> None:
        """Publish `message` (any dtype, C-contiguous) to every reader, in parts if large."""
        raw = message.reshape(-1).view(np.uint8)
        for start in range(0, max(len(raw), 1), self.data_bytes):
            part = raw[start : start + self.data_bytes]
            self._wait_acks(timeout_s)
            self._data[: len(part)] = part
            self._words[1] = len(part)
            self._words[0] = self._words[0] + 1

    def _wait_acks(self, timeout_s: float) -> None:
        seq = int(self._words[0])
        acks = self._words[LINE // 8 :: LINE // 8][: self.readers]
        if int(acks.min()) >= seq:
            return
        deadline = time.monotonic() + timeout_s
        spins = 0
        while int(acks.min()) < seq:
            if self._aborted:
                raise ChannelAborted("the step channel was aborted (a follower failed)")
            spins += 1
            _yield()
            if spins > 1000:
                if time.monotonic() > deadline:
                    late = [r for r in range(self.readers) if int(acks[r]) < seq]
                    raise RuntimeError(
                        f"followers {[r + 1 for r in late]} did not take the previous "
                        f"step message within {timeout_s:.0f} s"
                    )
                time.sleep(0)  # lets this process's other threads take the GIL

    # ---------------------------------------------------------------- reader

    def recv_into(self, out: np.ndarray) -> None:
        """Receive the next message into `out` (its byte size must be the message's)."""
        raw = out.reshape(-1).view(np.uint8)
        start = 0
        while True:
            n = self._next_part()
            raw[start : start + n] = self._data[:n]
            start += n
            self._ack()
            if start >= len(raw):
                return

    def send_framed(self, message: np.ndarray, timeout_s: float) -> None:
        """Publish `message` with its byte length in front, for `recv_framed` (one part up to
        the data region's size, so one hand-over per message in the common case)."""
        raw = message.reshape(-1).view(np.uint8)
        framed = np.empty(8 + len(raw), dtype=np.uint8)
        framed[:8].view(np.int64)[0] = len(raw)
        framed[8:] = raw
        self.send(framed, timeout_s)

    def recv_framed(self) -> np.ndarray:
        """The next message from `send_framed`, as uint8, whatever its size."""
        n = self._next_part()
        total = int(self._data[:8].view(np.int64)[0])
        out = np.empty(total, dtype=np.uint8)
        got = n - 8
        out[:got] = self._data[8:n]
        self._ack()
        while got < total:
            n = self._next_part()
            out[got : got + n] = self._data[:n]
            got += n
            self._ack()
        return out

    def _ack(self) -> None:
        assert self.reader is not None
        self._words[(LINE // 8) * (1 + self.reader)] = self._seen

    def _next_part(self) -> int:
        start = time.monotonic()
        sleep = 0.0
        while int(self._words[0]) == self._seen:
            if self._aborted:
                raise ChannelAborted("the step channel was closed")
            if time.monotonic() - start > SPIN_S:
                sleep = min(IDLE_SLEEP_S, max(sleep * 2, 1e-5))
                time.sleep(sleep)
            else:
                _yield()
        self._seen += 1
        return int(self._words[1])
