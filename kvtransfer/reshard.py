"""Heterogeneous TP: which KV heads a destination rank needs from which source ranks (pure).

Head placement (the engine's TP layers agree): with H KV heads over P ranks,
* H >= P (H divisible by P): rank r holds heads [r * H/P, (r+1) * H/P);
* H < P (P divisible by H): heads are replicated, P/H ranks per head; rank r holds head
  r // (P/H).

A destination rank needs its head range; each needed head is read from exactly one source
rank. When a head is replicated on the source side, the replica is picked by the destination
rank (round robin) to spread the load over the source ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtransfer.errors import KVLayoutError


@dataclass(frozen=True)
class HeadSlice:
    """Heads [src_start, src_end) of `source_rank`'s cache go to [dst_start, dst_end) locally."""

    source_rank: int
    src_start: int
    src_end: int
    dst_start: int
    dst_end: int

    @property
    def num_heads(self) -> int:
        return self.src_end - self.src_start


def check_tp(tp_size: int, num_kv_heads: int) -> None:
    if tp_size < 1:
        raise KVLayoutError("tp_size", f"must be >= 1, got {tp_size}")
    if num_kv_heads < 1:
        raise KVLayoutError("num_kv_heads", f"must be >= 1, got {num_kv_heads}")
    if num_kv_heads >= tp_size and num_kv_heads % tp_size:
        raise KVLayoutError("num_kv_heads", f"{num_kv_heads} not divisible by tp_size {tp_size}")
    if num_kv_heads < tp_size and tp_size % num_kv_heads:
        raise KVLayoutError("tp_size", f"{tp_size} not divisible by num_kv_heads {num_kv_heads}")


def rank_heads(tp_rank: int, tp_size: int, num_kv_heads: int) -> tuple[int, int]:
    """The global head range [start, end) that `tp_rank` holds."""
    check_tp(tp_size, num_kv_heads)
    if not 0 <= tp_rank < tp_size:
        raise KVLayoutError("tp_rank", f"{tp_rank} outside [0, {tp_size})")
    if num_kv_heads >= tp_size:
        per_rank = num_kv_heads // tp_size
        return tp_rank * per_rank, (tp_rank + 1) * per_rank
    head = tp_rank // (tp_size // num_kv_heads)
    return head, head + 1


def _holders(head: int, tp_size: int, num_kv_heads: int) -> list[int]:
    ranges = [rank_heads(r, tp_size, num_kv_heads) for r in range(tp_size)]
    return [r for r, (start, end) in enumerate(ranges) if start <= head < end]


def plan_for_destination(
    dst_rank: int, dst_tp: int, src_tp: int, num_kv_heads: int
) -> list[HeadSlice]:
    """The head slices `dst_rank` (of `dst_tp`) must read, merged into contiguous runs."""
    dst_start, dst_end = rank_heads(dst_rank, dst_tp, num_kv_heads)
    slices: list[HeadSlice] = []
    for head in range(dst_start, dst_end):
        holders = _holders(head, src_tp, num_kv_heads)
        src = holders[dst_rank % len(holders)]
        src_base = rank_heads(src, src_tp, num_kv_heads)[0]
        local_src, local_dst = head - src_base, head - dst_start
        last = slices[-1] if slices else None
        if (
            last
            and last.source_rank == src
            and last.src_end == local_src
            and last.dst_end == local_dst
        ):
            slices[-1] = HeadSlice(
                src, last.src_start, local_src + 1, last.dst_start, local_dst + 1
            )
        else:
            slices.append(HeadSlice(src, local_src, local_src + 1, local_dst, local_dst + 1))
    return slices


def readers_of_source(src_rank: int, src_tp: int, dst_tp: int, num_kv_heads: int) -> int:
    """How many destination ranks read from `src_rank`: the acks its lease must wait for."""
    return sum(
        any(
            s.source_rank == src_rank for s in plan_for_destination(d, dst_tp, src_tp, num_kv_heads)
        )
        for d in range(dst_tp)
    )
