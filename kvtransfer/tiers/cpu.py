"""CPU tier: a preallocated slab of block slots (pinned when CUDA is available) with LRU.

A slot holds one block as raw bytes ([L, 2, block_size, heads, head_dim] of the KV dtype; its
size is the view's KVCacheSpec.bytes_per_block).
Not thread-safe: the TieredStore calls it under its lock. Slots that an asynchronous copy is
filling are `reserve`d (pinned against eviction, hidden from lookups) until `publish`.

Hazard: device reads (`get(..., device=cuda)`) are enqueued on the caller's current stream,
not awaited, so an evicted slot may still be read by the device when it is written again.
Host writes into the slab therefore wait for the last device read first; device writes are
ordered after it by their stream (the caller's, or a side stream that waited on an event the
caller's stream recorded later, as the spill queue does).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from kvtransfer.tiers.placement import SlotLRU


def slot_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
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
    def __init__(
        self, bytes_per_block: int, budget_bytes: int, pin_memory: bool | None = None
    ) -> None:
        self.bytes_per_block = bytes_per_block
        num_slots = budget_bytes // bytes_per_block
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.slab = torch.empty((num_slots, bytes_per_block), dtype=torch.uint8, pin_memory=pin)
        self.lru = SlotLRU(num_slots)
        self._hidden: set[Hashable] = set()  # reserved: being filled, not readable yet
        self._last_read: torch.cuda.Event | None = None

    @property
    def num_slots(self) -> int:
        return self.lru.num_slots

    def __contains__(self, key: Hashable) -> bool:
        """Whether `key` can be read now (reserved keys cannot)."""
        return key in self.lru and key not in self._hidden

    def holds(self, key: Hashable) -> bool:
        """Whether `key` has a slot, readable or reserved."""
        return key in self.lru

    def put(
        self,
        keys: Sequence[Hashable],
        rows: torch.Tensor,
        pinned: bool = False,
        keep_evicted: bool = True,
    ) -> list[tuple[Hashable, torch.Tensor]]:
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
                    evicted.append((out[0], self._evicted_row(out[1], keep_evicted)))
                slots.append(slot)
            self._write_rows(slots, rows[start : start + step])
        return evicted

    def reserve(
        self, keys: Sequence[Hashable], keep_evicted: bool = True
    ) -> tuple[list[int], list[tuple[Hashable, torch.Tensor]]]:
        """Pinned, hidden slots for new `keys` (at most `lru.num_evictable()` of them) and the
        entries evicted for them (as `put` returns them). The caller fills the slots
        (`copy_into`) and then calls `publish(keys)`."""
        slots: list[int] = []
        evicted: list[tuple[Hashable, torch.Tensor]] = []
        for key in keys:
            slot, out = self.lru.allocate(key, pinned=True)
            if out is not None:
                evicted.append((out[0], self._evicted_row(out[1], keep_evicted)))
            self._hidden.add(key)
            slots.append(slot)
        return slots, evicted

    def publish(self, keys: Sequence[Hashable]) -> None:
        """Reserved keys whose slots are filled become readable (and evictable, as recent)."""
        for key in keys:
            self._hidden.remove(key)
            self.lru.unpin(key)

    def copy_into(self, slots: Sequence[int], rows: torch.Tensor) -> None:
        """Enqueues the copy of rows [n, bytes_per_block] into `slots` on the current stream
        (device rows: not awaited). Host rows wait for earlier device reads first."""
        if not rows.is_cuda:
            self.wait_for_reads()
        for pos, first, n in slot_runs(slots):
            self.slab[first : first + n].copy_(rows[pos : pos + n], non_blocking=True)

    def wait_for_reads(self) -> None:
        """Blocks until every device read of the slab enqueued so far has finished."""
        if self._last_read is not None:
            self._last_read.synchronize()
            self._last_read = None

    def _evicted_row(self, slot: int, keep: bool) -> torch.Tensor:
        return self.slab[slot].clone() if keep else self.slab[:0]

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
        for pos, first, n in slot_runs(slots):
            out[pos : pos + n].copy_(self.slab[first : first + n], non_blocking=True)
        if out.is_cuda:  # enqueued, not awaited: later writes of these slots wait for it
            self._last_read = torch.cuda.Event()
            self._last_read.record(torch.cuda.current_stream(out.device))
        return out

    def remove(self, key: Hashable) -> None:
        self.lru.remove(key)

    def unreserve(self, keys: Sequence[Hashable]) -> None:
        """Reserved keys whose slots were never filled (their copy failed) are dropped."""
        for key in keys:
            self._hidden.discard(key)
            self.lru.remove(key)

    def _write_rows(self, slots: list[int], rows: torch.Tensor) -> None:
        self.copy_into(slots, rows)
        if rows.is_cuda:
            torch.cuda.current_stream(
                rows.device
            ).synchronize()  # slab rows are read by the CPU next
