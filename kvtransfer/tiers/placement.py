"""Tier placement policy (pure, no torch): slots with LRU + pinning, spill and promote targets.

Each non-HBM tier is a fixed number of equal slots (budget // bytes per block). Inserting into a
full tier evicts its least recently used unpinned entry, which the caller spills to
`spill_target(tier)`. A hit in a lower tier is promoted to `promote_target(tier)`. Pinned
entries (swapped-out blocks of preempted requests) are never evicted.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Collection, Hashable

from kvtransfer.errors import TierFullError


class Tier(enum.Enum):
    HBM = "hbm"
    CPU = "cpu"
    NVME = "nvme"


_ORDER = (Tier.HBM, Tier.CPU, Tier.NVME)


def spill_target(tier: Tier, enabled: Collection[Tier]) -> Tier | None:
    """The next enabled tier below `tier`, or None (the block is dropped)."""
    below = _ORDER[_ORDER.index(tier) + 1 :]
    return next((t for t in below if t in enabled), None)


def promote_target(tier: Tier, enabled: Collection[Tier]) -> Tier | None:
    """Where a hit in `tier` is copied besides HBM: the nearest enabled tier above, except HBM."""
    above = [t for t in _ORDER[1 : _ORDER.index(tier)] if t in enabled]
    return above[-1] if above else None


class SlotLRU:
    """Maps keys to slots [0, num_slots); LRU order over unpinned keys."""

    def __init__(self, num_slots: int) -> None:
        assert num_slots >= 0
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # oldest first
        self._pinned: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru or key in self._pinned

    def slot_of(self, key: Hashable) -> int | None:
        return self._lru.get(key, self._pinned.get(key))

    def touch(self, key: Hashable) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)

    def can_allocate(self) -> bool:
        return bool(self._free) or bool(self._lru)

    def allocate(
        self, key: Hashable, pinned: bool = False
    ) -> tuple[int, tuple[Hashable, int] | None]:
        """A slot for a new `key` and the (key, slot) evicted to make room, if any."""
        assert key not in self, "allocate() of a present key"
        evicted: tuple[Hashable, int] | None = None
        if self._free:
            slot = self._free.pop()
        elif self._lru:
            evicted = self._lru.popitem(last=False)
            slot = evicted[1]
        else:
            raise TierFullError(f"all {self.num_slots} slots pinned")
        (self._pinned if pinned else self._lru)[key] = slot
        return slot, evicted

    def num_evictable(self) -> int:
        """Slots an allocation can take now: free ones and unpinned entries."""
        return len(self._free) + len(self._lru)

    def unpin(self, key: Hashable) -> None:
        """Makes a pinned key evictable again, as the most recently used."""
        self._lru[key] = self._pinned.pop(key)

    def remove(self, key: Hashable) -> int | None:
        slot = self._lru.pop(key, None)
        if slot is None:
            slot = self._pinned.pop(key, None)
        if slot is not None:
            self._free.append(slot)
        return slot

    def lru_keys(self) -> list[Hashable]:
        return list(self._lru)
