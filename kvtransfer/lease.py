"""Leases on a sender's KV blocks: the engine must not free leased blocks until released.

A lease ends on the last expected ack (`num_readers` destination ranks read from this source
rank), on an explicit failure notice, on expiry (`lease_s` after registration, whatever
happens: a receiver that never acks cannot pin blocks forever) or when the table closes.

Threading contract: `ack` / `fail` / `reader` may be called from any thread (transport
threads); `on_release(transfer_id, block_ids)` is invoked exactly once per lease and only
inside `poll()` or `close()`, on the caller's (the engine's) thread, so the engine's block pool
needs no lock.

Hazard: a lease can end while a transport thread still copies the blocks out (an expiry in
the middle of a stream). The lease then sits in DRAINING: its gate refuses new reads and the
release waits until the in-flight copy finished (a bounded memcpy); only then are the blocks
handed back. A copy finished before release is a complete, consistent snapshot.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from kvtransfer.errors import UnknownTransferError
from kvtransfer.gate import AccessGate

ReleaseCallback = Callable[[str, list[int]], None]


class LeaseState(enum.Enum):
    ACTIVE = "active"
    DRAINING = "draining"  # ended, waiting for in-flight reads to stop
    RELEASED = "released"


class ReleaseReason(enum.Enum):
    ACKED = "acked"
    FAILED = "failed"
    EXPIRED = "expired"
    CLOSED = "closed"


@dataclass
class Lease:
    transfer_id: str
    block_ids: list[int]
    deadline: float
    num_readers: int
    num_acks: int = 0
    state: LeaseState = LeaseState.ACTIVE
    reason: ReleaseReason | None = None
    detail: str = ""
    gate: AccessGate = field(default_factory=AccessGate)


class LeaseTable:
    def __init__(
        self,
        lease_s: float,
        on_release: ReleaseCallback,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert lease_s > 0
        self._lease_s = lease_s
        self._on_release = on_release
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self.released: dict[ReleaseReason, int] = {r: 0 for r in ReleaseReason}

    def add(self, transfer_id: str, block_ids: Sequence[int], num_readers: int = 1) -> Lease:
        assert num_readers >= 1
        with self._lock:
            if transfer_id in self._leases:
                raise ValueError(f"transfer_id: {transfer_id!r} already leased")
            lease = Lease(transfer_id, list(block_ids), self._clock() + self._lease_s, num_readers)
            self._leases[transfer_id] = lease
            return lease

    def ack(self, transfer_id: str) -> bool:
        """One reader finished; the lease ends with the last one. False if no live lease."""
        with self._lock:
            lease = self._live(transfer_id)
            if lease is None:
                return False
            lease.num_acks += 1
            if lease.num_acks >= lease.num_readers:
                self._end(lease, ReleaseReason.ACKED, "")
            return True

    def fail(self, transfer_id: str, detail: str) -> bool:
        """Explicit failure notice: ends the lease at once. False if no live lease."""
        with self._lock:
            lease = self._live(transfer_id)
            if lease is None:
                return False
            self._end(lease, ReleaseReason.FAILED, detail)
            return True

    @contextmanager
    def reader(self, transfer_id: str) -> Iterator[Lease]:
        """Holds the lease's blocks for one copy; raises UnknownTransferError if not ACTIVE."""
        with self._lock:
            lease = self._live(transfer_id)
        if lease is None:
            raise UnknownTransferError(transfer_id)
        with lease.gate.access():
            yield lease

    def is_active(self, transfer_id: str) -> bool:
        with self._lock:
            return self._live(transfer_id) is not None

    def poll(self) -> list[Lease]:
        """Expires overdue leases and releases drained ones (callbacks run here). Non-blocking."""
        now = self._clock()
        with self._lock:
            for lease in self._leases.values():
                if lease.state is LeaseState.ACTIVE and now >= lease.deadline:
                    self._end(lease, ReleaseReason.EXPIRED, f"lease expired after {self._lease_s}s")
            done = [
                lease
                for lease in self._leases.values()
                if lease.state is LeaseState.DRAINING and lease.gate.try_close()
            ]
            for lease in done:
                lease.state = LeaseState.RELEASED
                del self._leases[lease.transfer_id]
                assert lease.reason is not None
                self.released[lease.reason] += 1
        for lease in done:
            self._on_release(lease.transfer_id, lease.block_ids)
        return done

    def close(self, wait_s: float = 5.0) -> list[Lease]:
        """Ends every lease and releases them, waiting up to `wait_s` for in-flight reads."""
        with self._lock:
            for lease in self._leases.values():
                if lease.state is LeaseState.ACTIVE:
                    self._end(lease, ReleaseReason.CLOSED, "sender closed")
        released: list[Lease] = []
        deadline = time.monotonic() + wait_s
        while True:
            released += self.poll()
            with self._lock:
                if not self._leases or time.monotonic() >= deadline:
                    leftover = list(self._leases)
                    break
            time.sleep(0.001)
        assert not leftover, f"reads still in flight on {leftover} after {wait_s}s"
        return released

    def num_live(self) -> int:
        with self._lock:
            return len(self._leases)

    def _live(self, transfer_id: str) -> Lease | None:
        lease = self._leases.get(transfer_id)
        return lease if lease is not None and lease.state is LeaseState.ACTIVE else None

    def _end(self, lease: Lease, reason: ReleaseReason, detail: str) -> None:
        lease.state, lease.reason, lease.detail = LeaseState.DRAINING, reason, detail
        lease.gate.try_close()
