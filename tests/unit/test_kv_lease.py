"""Sender leases: ack, failure notice, expiry (injectable clock), draining while a read runs."""

from __future__ import annotations

import threading

import pytest

from kvtransfer.errors import TransferAbortedError, UnknownTransferError
from kvtransfer.lease import LeaseTable, ReleaseReason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(lease_s: float = 10.0) -> tuple[LeaseTable, Clock, list[tuple[str, list[int]]]]:
    clock, calls = Clock(), []
    table = LeaseTable(lease_s, lambda tid, ids: calls.append((tid, ids)), clock)
    return table, clock, calls


def test_ack_releases_once_on_poll() -> None:
    table, _, calls = make()
    table.add("a", [1, 2])
    assert table.ack("a")
    assert calls == []  # callbacks only inside poll
    table.poll()
    table.poll()
    assert calls == [("a", [1, 2])]
    assert not table.ack("a")  # already released
    assert table.released[ReleaseReason.ACKED] == 1


def test_lease_waits_for_every_reader() -> None:
    table, _, calls = make()
    table.add("a", [3], num_readers=2)
    table.ack("a")
    table.poll()
    assert calls == []
    table.ack("a")
    table.poll()
    assert calls == [("a", [3])]


def test_failure_notice_releases() -> None:
    table, _, calls = make()
    table.add("a", [1])
    assert table.fail("a", "receiver gave up")
    table.poll()
    assert calls == [("a", [1])] and table.released[ReleaseReason.FAILED] == 1


def test_expiry_at_deadline_not_before() -> None:
    table, clock, calls = make(lease_s=10.0)
    table.add("a", [1])
    clock.now = 9.99
    table.poll()
    assert calls == []
    clock.now = 10.0
    table.poll()
    assert calls == [("a", [1])] and table.released[ReleaseReason.EXPIRED] == 1


def test_expiry_during_a_read_defers_release_until_the_read_ends() -> None:
    table, clock, calls = make(lease_s=1.0)
    table.add("a", [5])
    inside, leave = threading.Event(), threading.Event()

    def read() -> None:
        with table.reader("a"):
            inside.set()
            leave.wait(5)

    t = threading.Thread(target=read)
    t.start()
    inside.wait(5)
    clock.now = 2.0
    table.poll()
    assert calls == []  # DRAINING: the blocks are still being copied out
    with pytest.raises((UnknownTransferError, TransferAbortedError)):
        with table.reader("a"):
            pass
    leave.set()
    t.join()
    table.poll()
    assert calls == [("a", [5])]


def test_duplicate_and_unknown_ids() -> None:
    table, _, calls = make()
    table.add("a", [1])
    with pytest.raises(ValueError):
        table.add("a", [2])
    assert not table.ack("zzz") and not table.fail("zzz", "x")
    with pytest.raises(UnknownTransferError):
        with table.reader("zzz"):
            pass


def test_close_releases_everything() -> None:
    table, _, calls = make()
    table.add("a", [1])
    table.add("b", [2])
    table.close()
    assert sorted(calls) == [("a", [1]), ("b", [2])]
    assert table.released[ReleaseReason.CLOSED] == 2
