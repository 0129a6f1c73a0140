"""The shared-memory step broadcast: ordering, multi-part messages, bounded waits, abort."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from engine.executor.shm_channel import ChannelAborted, ShmBroadcast, abort_all


def _pair(readers: int = 2, data_bytes: int = 64):
    writer = ShmBroadcast.create(readers, data_bytes)
    ends = [ShmBroadcast.attach(writer.path, readers, r) for r in range(readers)]
    writer.unlink()
    return writer, ends


def test_every_reader_gets_every_message_in_order_including_multipart():
    writer, ends = _pair(readers=2, data_bytes=64)  # 8 int64 per part: most messages span parts
    rng = np.random.default_rng(0)
    messages = [
        rng.integers(-(2**40), 2**40, size=int(n), dtype=np.int64) for n in rng.integers(1, 40, 60)
    ]
    got: list[list[np.ndarray]] = [[], []]

    def read(r: int) -> None:
        for m in messages:
            out = np.empty_like(m)
            ends[r].recv_into(out)
            got[r].append(out)

    threads = [threading.Thread(target=read, args=(r,)) for r in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the readers spin: threads of one process hand the GIL over fast
    try:
        for t in threads:
            t.start()
        for m in messages:
            writer.send(m, timeout_s=10)
        for t in threads:
            t.join(10)
    finally:
        sys.setswitchinterval(interval)
    for r in range(2):
        assert len(got[r]) == len(messages)
        assert all(np.array_equal(a, b) for a, b in zip(messages, got[r]))


def test_writer_waits_bounded_for_a_reader_that_stopped_reading():
    writer, ends = _pair(readers=2)
    writer.send(np.arange(4, dtype=np.int64), timeout_s=1)
    out = np.empty(4, dtype=np.int64)
    ends[0].recv_into(out)  # reader 1 never takes it
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"followers \[2\]"):
        writer.send(np.arange(4, dtype=np.int64), timeout_s=0.3)
    assert time.monotonic() - start < 2


def test_abort_releases_a_blocked_writer_and_reader():
    writer, ends = _pair(readers=1)
    errors: list[BaseException] = []

    def wait_reader() -> None:
        try:
            ends[0].recv_into(np.empty(1, dtype=np.int64))
        except BaseException as err:  # noqa: BLE001 - recorded for the assertion
            errors.append(err)

    t = threading.Thread(target=wait_reader)
    t.start()
    time.sleep(0.1)
    abort_all()
    t.join(5)
    assert not t.is_alive() and isinstance(errors[0], ChannelAborted)
    with pytest.raises(ChannelAborted):
        writer._aborted = False
        writer.send(np.zeros(1, dtype=np.int64), timeout_s=5)  # first send: no ack needed
        abort_all()
        writer.send(np.zeros(1, dtype=np.int64), timeout_s=5)  # waits on the reader: aborted
