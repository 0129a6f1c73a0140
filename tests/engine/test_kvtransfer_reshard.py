"""Heterogeneous TP: the pure plan, and moving head slices through the fake and gRPC transports."""

from __future__ import annotations

import time

import pytest
import torch

from kvtransfer.cache_view import KVCacheView, TPLayout
from kvtransfer.interfaces import KVPoll
from kvtransfer.receiver import ThreadedReceiver
from kvtransfer.reshard import HeadSlice, plan_for_destination, rank_heads, readers_of_source
from kvtransfer.sender import LeasedSender
from kvtransfer.transports.fake import FakeFabric, FakeReceiver, FakeSender
from kvtransfer.transports.grpc_stream import GrpcReceiver, GrpcSender


def test_plan_2_to_1_reads_both_halves() -> None:
    assert plan_for_destination(0, 1, 2, 8) == [HeadSlice(0, 0, 4, 0, 4), HeadSlice(1, 0, 4, 4, 8)]


def test_plan_1_to_2_splits_the_single_source() -> None:
    assert plan_for_destination(0, 2, 1, 8) == [HeadSlice(0, 0, 4, 0, 4)]
    assert plan_for_destination(1, 2, 1, 8) == [HeadSlice(0, 4, 8, 0, 4)]
    assert readers_of_source(0, 1, 2, 8) == 2


def test_plan_2_to_4() -> None:
    plans = [plan_for_destination(d, 4, 2, 8) for d in range(4)]
    assert plans == [
        [HeadSlice(0, 0, 2, 0, 2)],
        [HeadSlice(0, 2, 4, 0, 2)],
        [HeadSlice(1, 0, 2, 0, 2)],
        [HeadSlice(1, 2, 4, 0, 2)],
    ]
    assert [readers_of_source(s, 2, 4, 8) for s in range(2)] == [2, 2]


def test_replicated_heads_when_fewer_kv_heads_than_tp() -> None:
    assert [rank_heads(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    # source TP 4 holds each of 2 heads twice; destination TP 1 reads one replica of each
    assert plan_for_destination(0, 1, 4, 2) == [HeadSlice(0, 0, 1, 0, 1), HeadSlice(2, 0, 1, 1, 2)]
    # destination TP 4 from source TP 2: replicas on the destination side each read their head
    assert [plan_for_destination(d, 4, 2, 2) for d in range(4)] == [
        [HeadSlice(0, 0, 1, 0, 1)],
        [HeadSlice(0, 0, 1, 0, 1)],
        [HeadSlice(1, 0, 1, 0, 1)],
        [HeadSlice(1, 0, 1, 0, 1)],
    ]
    # source replicas spread over destination ranks: 4 -> 4 with 2 heads uses every source rank
    used = {p.source_rank for d in range(4) for p in plan_for_destination(d, 4, 4, 2)}
    assert used == {0, 1, 2, 3}


def test_every_destination_head_is_covered_exactly_once() -> None:
    for heads, src_tp, dst_tp in [(8, 1, 8), (8, 8, 1), (8, 2, 4), (8, 4, 2), (2, 8, 4), (4, 2, 8)]:
        for d in range(dst_tp):
            covered = [
                h
                for p in plan_for_destination(d, dst_tp, src_tp, heads)
                for h in range(p.dst_start, p.dst_end)
            ]
            start, end = rank_heads(d, dst_tp, heads)
            assert covered == list(range(end - start))


L, N, BS, H, D = 2, 10, 4, 4, 8


def _shard(full: torch.Tensor, rank: int, tp: int) -> KVCacheView:
    start, end = rank_heads(rank, tp, H)
    return KVCacheView(full[..., start:end, :].clone(), TPLayout(rank, tp, H))


@pytest.mark.parametrize("transport", ["fake", "grpc"])
@pytest.mark.parametrize(("src_tp", "dst_tp"), [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_reshard_through_transport(transport: str, src_tp: int, dst_tp: int) -> None:
    full = torch.randn(L, 2, N, BS, H, D)
    released: list[str] = []
    on_release = lambda tid, ids: released.append(tid)  # noqa: E731
    fabric = FakeFabric()
    senders: list[LeasedSender] = []
    for r in range(src_tp):
        view = _shard(full, r, src_tp)
        if transport == "fake":
            senders.append(FakeSender(fabric, f"p{r}", view, model_salt="m", on_release=on_release))
        else:
            senders.append(
                GrpcSender(view, worker_id=f"p{r}", model_salt="m", on_release=on_release)
            )
    addresses = [s.address for s in senders]
    src_ids, dst_ids = [2, 7, 5], [9, 1, 4]
    handles = [
        s.register(
            "t1",
            src_ids,
            [],
            12,
            num_readers=readers_of_source(r, src_tp, dst_tp, H),
            source_addresses=addresses,
        )
        for r, s in enumerate(senders)
    ]
    dst_views = [
        KVCacheView(
            torch.zeros(L, 2, N, BS, H // dst_tp if H >= dst_tp else 1, D), TPLayout(d, dst_tp, H)
        )
        for d in range(dst_tp)
    ]
    receivers: list[ThreadedReceiver] = [
        FakeReceiver(fabric, v, on_release=on_release)
        if transport == "fake"
        else GrpcReceiver(v, on_release=on_release)
        for v in dst_views
    ]
    try:
        for rcv in receivers:
            rcv.start(handles[0], dst_ids)
        for rcv in receivers:
            deadline = time.monotonic() + 5
            while rcv.poll("t1") is not KVPoll.DONE and time.monotonic() < deadline:
                time.sleep(0.005)
            assert rcv.poll("t1") is KVPoll.DONE, rcv.failure_reason("t1")
        for d, view in enumerate(dst_views):
            start, end = rank_heads(d, dst_tp, H)
            expected = full[..., start:end, :].index_select(2, torch.tensor(src_ids))
            assert torch.equal(view.read_blocks(dst_ids), expected)
        deadline = time.monotonic() + 5
        while len(released) < src_tp and time.monotonic() < deadline:
            for s in senders:
                s.poll()
            time.sleep(0.005)
        assert released == ["t1"] * src_tp  # every source rank released once, after all readers
    finally:
        for rcv in receivers:
            rcv.close()
        for s in senders:
            s.close()
