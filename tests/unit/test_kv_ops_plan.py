"""The pure half of whole-group KV ops: which rank holds, supplies and stores which KV heads
(it must agree with the engine's QKV layer and with kvtransfer's reshard), and the KV message's
wire packing."""

from __future__ import annotations

import pytest

from engine.executor.kv_ops import HeadRun, KVOp, rank_kv_heads, read_plan, write_plan
from engine.executor.step_channel import MessageKind, pack_kv, unpack_kv
from kvtransfer.reshard import rank_heads

LAYOUTS = [
    (1, 1),
    (2, 2),
    (8, 2),
    (8, 4),
    (1, 2),
    (1, 4),
    (2, 4),
    (4, 8),
    (16, 8),
]  # (KV heads, TP)


@pytest.mark.parametrize(("heads", "size"), LAYOUTS)
def test_placement_agrees_with_reshard(heads, size):
    assert [rank_kv_heads(r, size, heads) for r in range(size)] == [
        rank_heads(r, size, heads) for r in range(size)
    ]


@pytest.mark.parametrize(("heads", "size"), LAYOUTS)
def test_read_takes_each_head_once_from_its_lowest_holder(heads, size):
    for h0 in range(heads):
        for h1 in range(h0 + 1, heads + 1):
            runs = read_plan((h0, h1), size, heads)
            assert [h for run in runs for h in range(run.start, run.end)] == list(range(h0, h1))
            for run in runs:
                assert run.rank == min(r for r in range(size) if _holds(r, size, heads, run.start))


def _holds(rank: int, size: int, heads: int, head: int) -> bool:
    start, end = rank_kv_heads(rank, size, heads)
    return start <= head < end


@pytest.mark.parametrize(("heads", "size"), LAYOUTS)
def test_write_reaches_every_replica(heads, size):
    runs = write_plan((0, heads), size, heads)
    assert [run.rank for run in runs] == list(range(size))  # every rank holds some head
    assert write_plan((0, 1), 4, 1) == [HeadRun(r, 0, 1) for r in range(4)]
    assert write_plan((1, 2), 2, 4) == [HeadRun(0, 1, 2)]


def test_kv_message_round_trips():
    op = KVOp(True, (3, 9, 1), (1, 2), (0, 4))
    header, payload = pack_kv(op, seq=7)
    values = header.tolist()
    assert (
        values[0] == MessageKind.KV_WRITE and values[6] == 7 and values[7] == payload.numel() == 3
    )
    assert unpack_kv(values, payload) == op
    read = op._replace(write=False)
    assert unpack_kv(pack_kv(read, 0)[0].tolist(), pack_kv(read, 0)[1]) == read
