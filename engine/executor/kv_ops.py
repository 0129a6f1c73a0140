"""KV block reads and writes that span a whole TP group (the collective half of
kvtransfer.tp_view.TPGroupKVView).

Each rank's cache `[L, 2, N, block_size, h_local, D]` holds a slice of the KV heads, so a read
of heads [h0, h1) gathers slices to rank 0 and a write sends each rank its slice:

    leader    TPExecutor.read_kv / write_kv: publish the `KVOp` on the step channel, then
              `leader_read` / `leader_write` (rank 0's own slice locally, the rest by p2p)
    follower  run_loop receives the KVOp and runs `follower_serve` (send or receive its slice)

Head placement (engine.layers.linear.QKVParallelLinear agrees): H KV heads over P ranks, rank
r holds [r*H//P, r*H//P + max(1, H//P)); with H < P every head is replicated on P/H ranks. A
read takes each head from its lowest-ranked holder (one replica); a write goes to every holder.

The KV bytes move on the model group (`TPGroup.group`: NCCL on GPU, gloo on CPU), never
through the step channel, which carries only the op (block ids, head and layer ranges).

Hazards: every rank derives the same plan from the same KVOp (`read_plan` / `write_plan` are
pure), and a rank outside a plan does nothing. Two ops (or an op and a step) interleaving on
the group would pair the wrong sends and receives: the leader serialises them under its
executor's lock. The leader bounds its waits with `timeout_s`; followers wait as long as the
group's own timeout. On CUDA the leader's side ends with a stream synchronisation: NCCL's
point-to-point waits only order streams, and a dead peer must fail the op inside the executor's
failure handling (the watchdog aborts the group), not later in the caller's first copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from engine.distributed.parallel_state import TPGroup, wait_bounded


class KVOp(NamedTuple):
    """One whole-group block read or write: global heads [h0, h1), layers [l0, l1)."""

    write: bool
    block_ids: tuple[int, ...]
    heads: tuple[int, int]
    layers: tuple[int, int]


class HeadRun(NamedTuple):
    """Rank `rank` holds (and moves) global heads [start, end) of an op."""

    rank: int
    start: int
    end: int


def rank_kv_heads(rank: int, size: int, num_kv_heads: int) -> tuple[int, int]:
    """The global KV head range [start, end) that `rank` of `size` holds."""
    start = rank * num_kv_heads // size
    return start, start + max(1, num_kv_heads // size)


def read_plan(heads: tuple[int, int], size: int, num_kv_heads: int) -> list[HeadRun]:
    """Which rank supplies which heads of `heads`: each head from its lowest-ranked holder."""
    runs: list[HeadRun] = []
    covered = heads[0]
    for rank in range(size):
        start, end = rank_kv_heads(rank, size, num_kv_heads)
        lo, hi = max(covered, start), min(heads[1], end)
        if lo < hi:
            runs.append(HeadRun(rank, lo, hi))
            covered = hi
    return runs


def write_plan(heads: tuple[int, int], size: int, num_kv_heads: int) -> list[HeadRun]:
    """Which rank stores which heads of `heads`: every holder of every head (replicas too)."""
    runs = []
    for rank in range(size):
        start, end = rank_kv_heads(rank, size, num_kv_heads)
        lo, hi = max(heads[0], start), min(heads[1], end)
        if lo < hi:
            runs.append(HeadRun(rank, lo, hi))
    return runs


def _local(cache: torch.Tensor, op: KVOp, run: HeadRun, base: int) -> torch.Tensor:
    """The view of `cache` that `run` covers on this rank (its first head is global `base`)."""
    return cache[op.layers[0] : op.layers[1], ..., run.start - base : run.end - base, :]


def _shape(cache: torch.Tensor, op: KVOp, num_heads: int) -> tuple[int, ...]:
    _, _, _, block_size, _, head_dim = cache.shape
    return (op.layers[1] - op.layers[0], 2, len(op.block_ids), block_size, num_heads, head_dim)


def _index(cache: torch.Tensor, op: KVOp) -> torch.Tensor:
    return torch.tensor(op.block_ids, dtype=torch.int64, device=cache.device)


def leader_read(
    tp: TPGroup, cache: torch.Tensor, op: KVOp, num_kv_heads: int, timeout_s: float
) -> torch.Tensor:
    """Rank 0: the op's blocks of every rank as one tensor [l, 2, n, bs, h1 - h0, D]."""
    h0, h1 = op.heads
    out = torch.empty(_shape(cache, op, h1 - h0), dtype=cache.dtype, device=cache.device)
    index, base = _index(cache, op), rank_kv_heads(0, tp.size, num_kv_heads)[0]
    pending: list[tuple[HeadRun, torch.Tensor, dist.Work | None]] = []
    for run in read_plan(op.heads, tp.size, num_kv_heads):
        if run.rank == 0:
            _wire(out)[..., run.start - h0 : run.end - h0, :] = _wire(
                _local(cache, op, run, base)
            ).index_select(2, index)
            continue
        buf = torch.empty(
            _shape(cache, op, run.end - run.start), dtype=cache.dtype, device=cache.device
        )
        pending.append((run, buf, dist.irecv(_wire(buf), group=tp.group, group_src=run.rank)))
    for run, buf, work in pending:
        wait_bounded(work, timeout_s)
        _wire(out)[..., run.start - h0 : run.end - h0, :] = _wire(buf)
    _settle(cache.device)
    return out


def leader_write(
    tp: TPGroup,
    cache: torch.Tensor,
    op: KVOp,
    data: torch.Tensor,
    num_kv_heads: int,
    timeout_s: float,
) -> None:
    """Rank 0: store `data` [l, 2, n, bs, h1 - h0, D] (on rank 0's device) on every holder."""
    h0 = op.heads[0]
    index, base = _index(cache, op), rank_kv_heads(0, tp.size, num_kv_heads)[0]
    pending: list[tuple[torch.Tensor, dist.Work | None]] = []
    for run in write_plan(op.heads, tp.size, num_kv_heads):
        part = data[..., run.start - h0 : run.end - h0, :]
        if run.rank == 0:
            _wire(_local(cache, op, run, base)).index_copy_(2, index, _wire(part))
            continue
        part = part.contiguous()  # kept alive until its send completes
        pending.append((part, dist.isend(_wire(part), group=tp.group, group_dst=run.rank)))
    for _, work in pending:
        wait_bounded(work, timeout_s)
    _settle(cache.device)


def _wire(t: torch.Tensor) -> torch.Tensor:
    """An FP8 cache's bytes as uint8 (a view: same storage) for the wire and for the index ops:
    gloo and older NCCL have no float8 types, nor has CPU index_copy_; other dtypes as they are."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def _settle(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def follower_serve(tp: TPGroup, cache: torch.Tensor, op: KVOp, num_kv_heads: int) -> None:
    """A follower's side of `op`: send rank 0 its slice (read) or receive and store it (write)."""
    plan = write_plan if op.write else read_plan
    mine = [run for run in plan(op.heads, tp.size, num_kv_heads) if run.rank == tp.rank]
    if not mine:
        return
    run, index = mine[0], _index(cache, op)
    local = _local(cache, op, run, rank_kv_heads(tp.rank, tp.size, num_kv_heads)[0])
    if op.write:
        buf = torch.empty(
            _shape(cache, op, run.end - run.start), dtype=cache.dtype, device=cache.device
        )
        dist.recv(_wire(buf), group=tp.group, group_src=0)
        _wire(local).index_copy_(2, index, _wire(buf))
    else:
        dist.send(_wire(local).index_select(2, index).contiguous(), group=tp.group, group_dst=0)
