"""The p2p KV link after a failure: a transfer whose sends keep failing frees both sides'
blocks, the group is rebuilt under a new epoch after each failure and carries the next
transfer; a single failure elsewhere is retried on the new epoch unseen; a member that never
comes back leaves the link FAILED and receivers pull over gRPC instead. In-process gloo groups
over one store."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from kvtransfer.interfaces import KVPoll
from kvtransfer.transports.p2p_link import LinkFailedError, LinkState
from tests.distributed.kv_links import P2PPair, in_process_links

L, N, BS, H, D = 2, 24, 4, 2, 8
TIMEOUT_S = 2.0


class Pair(P2PPair):
    def transfer(self, tid: str, src_ids: list[int], dst_ids: list[int]) -> tuple[KVPoll, float]:
        start = time.monotonic()
        self.receiver.start(self.register(tid, src_ids), dst_ids)
        return self.finish(tid), time.monotonic() - start

    def wait_sender_released(self, tid: str) -> None:
        self.sender_released(tid, within_s=TIMEOUT_S)


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    rebuild_timeout_s = getattr(request, "param", 5.0)
    p = Pair(
        in_process_links(2, timeout_s=20.0, rebuild_timeout_s=rebuild_timeout_s),
        (L, 2, N, BS, H, D),
        TIMEOUT_S,
    )
    yield p
    p.close()


def _wait_for(condition: object, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.01)


def test_failing_sends_free_both_sides_then_the_rebuilt_group_carries_the_next(pair: Pair) -> None:
    link = pair.links[0]
    calls: list[str] = []

    def fail_every_send_of_t1(tid: str) -> None:  # 2nd call: right before the sends are posted
        calls.append(tid)
        if tid == "t1" and calls.count("t1") % 2 == 0:
            link.fail(link.current, "injected: the send failed, the communicator is gone")

    pair.sender.chunk_hook = fail_every_send_of_t1
    state, took = pair.transfer("t1", [1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert state is KVPoll.FAILED and took < TIMEOUT_S
    assert "gave up after 3 attempts" in (pair.receiver.failure_reason("t1") or "")  # one per epoch
    assert pair.received == [("t1", [6, 7, 8, 9, 10])]  # the receiver freed its blocks
    pair.wait_sender_released("t1")
    assert pair.sent == [("t1", [1, 2, 3, 4, 5])]  # and the sender its lease, via the notice
    _wait_for(
        lambda: all(link.epoch == 4 and link.state is LinkState.READY for link in pair.links), 5.0
    )
    assert [link.epoch for link in pair.links] == [4, 4]  # rebuilt after each of the 3 failures

    state, _ = pair.transfer("t2", [11, 3, 17], [2, 20, 5])
    assert state is KVPoll.DONE, pair.receiver.failure_reason("t2")
    assert torch.equal(pair.dst.read_blocks([2, 20, 5]), pair.src.read_blocks([11, 3, 17]))
    assert [link.epoch for link in pair.links] == [4, 4]


@pytest.mark.parametrize("pair", [0.5], indirect=True)
def test_member_that_never_returns_fails_the_link_and_grpc_still_carries_kv(pair: Pair) -> None:
    pair.links[0].close()  # the sender's link is gone for good (its gRPC server still serves)
    receiver_link = pair.links[1]
    receiver_link.fail(receiver_link.current, "injected: peer died")
    _wait_for(lambda: receiver_link.state is LinkState.FAILED, 3.0)
    assert receiver_link.state is LinkState.FAILED
    assert "1 of 2 members joined" in receiver_link.reason and "gRPC" in receiver_link.reason
    with pytest.raises(LinkFailedError):
        receiver_link.acquire(time.monotonic() + 0.1)

    state, _ = pair.transfer("t1", [4, 5, 6], [7, 8, 9])
    assert state is KVPoll.DONE, pair.receiver.failure_reason("t1")
    assert torch.equal(pair.dst.read_blocks([7, 8, 9]), pair.src.read_blocks([4, 5, 6]))


def test_break_between_transfers_is_retried_on_the_new_epoch(pair: Pair) -> None:
    link = pair.links[0]
    state, _ = pair.transfer("t1", [1, 2], [3, 4])
    assert state is KVPoll.DONE
    link.fail(link.current, "injected: a failure elsewhere in the group")
    state, _ = pair.transfer("t2", [5, 6, 7], [8, 9, 10])  # asks at whatever epoch it sees first
    assert state is KVPoll.DONE, pair.receiver.failure_reason("t2")
    assert torch.equal(pair.dst.read_blocks([8, 9, 10]), pair.src.read_blocks([5, 6, 7]))
    assert [link.epoch for link in pair.links] == [2, 2]
