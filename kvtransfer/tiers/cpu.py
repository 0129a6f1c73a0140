"""CPU tier: a preallocated slab of block slots (pinned when CUDA is available) with LRU.

A slot holds one block as raw bytes ([L, 2, block_size, heads, head_dim] of the cache dtype).
Not thread-safe: the TieredStore calls it under its lock.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from kvtransfer.tiers.placement import SlotLRU


def _runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(position in `slots`, first slot, length) of each run of consecutive slots."""
    runs: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == s:
            pos, first, n = runs[-1]
            runs[-1] = (pos, first, n + 1)
        else:
            runs.append((i, s, 1))
    return runs


class CpuTier:
    def __init__(self, bytes_per_block: int, budget_bytes: int, pin_memory: bool | None = None) -> None:
        self.bytes_per_block = bytes_per_block
        num_slots = budget_bytes // bytes_per_block
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.slab = torch.empty((num_slots, bytes_per_block), dtype=torch.uint8, pin_memory=pin)
        self.lru = SlotLRU(num_slots)

    @property
    def num_slots(self) -> int:
        return self.lru.num_slots

    def __contains__(self, key: Hashable) -> bool:
        return key in self.lru

    def put(self, keys: Sequence[Hashable], rows: torch.Tensor, pinned: bool = False,
            keep_evicted: bool = True) -> list[tuple[Hashable, torch.Tensor]]:
        """Stores rows [n, bytes_per_block] (any device); returns evicted (key, bytes copy),
        or (key, empty tensor) when `keep_evicted` is False (nothing below to spill to).

        Works in batches of at most `num_slots` rows, each written before the next allocates,
        so a batch never evicts (and copies out) a slot that is not written yet.
        """
        evicted: list[tuple[Hashable, torch.Tensor]] = []
        step = max(1, self.num_slots)
        for start in range(0, len(keys), step):
            slots: list[int] = []
            for key in keys[start : start + step]:
                slot, out = self.lru.allocate(key, pinned)
                if out is not None:
                    evicted.append((out[0], self.slab[out[1]].clone() if keep_evicted else self.slab[:0]))
                slots.append(slot)
            self._write_rows(slots, rows[start : start + step])
        return evicted

    def get(self, keys: Sequence[Hashable], device: torch.device | None = None) -> torch.Tensor:
        """Rows of present `keys` [n, bytes_per_block] on `device` (marks them recently used)."""
        slots = []
        for key in keys:
            slot = self.lru.slot_of(key)
            assert slot is not None, "get() of a missing key"
            self.lru.touch(key)
            slots.append(slot)
        device = device or self.slab.device
        out = torch.empty((len(slots), self.bytes_per_block), dtype=torch.uint8, device=device)
        for pos, first, n in _runs(slots):
            out[pos : pos + n].copy_(self.slab[first : first + n], non_blocking=True)
        return out

    def remove(self, key: Hashable) -> None:
        self.lru.remove(key)

    def _write_rows(self, slots: list[int], rows: torch.Tensor) -> None:
        for pos, first, n in _runs(slots):
            self.slab[first : first + n].copy_(rows[pos : pos + n], non_blocking=True)
        if rows.is_cuda:
            torch.cuda.current_stream(rows.device).synchronize()  # slab rows are read by the CPU next
