"""Tier placement policy (pure): slot LRU, pinning, spill and promote targets."""

from __future__ import annotations

import pytest

from kvtransfer.errors import TierFullError
from kvtransfer.tiers.placement import SlotLRU, Tier, promote_target, spill_target


def test_spill_and_promote_targets() -> None:
    both = {Tier.CPU, Tier.NVME}
    assert spill_target(Tier.HBM, both) is Tier.CPU
    assert spill_target(Tier.CPU, both) is Tier.NVME
    assert spill_target(Tier.NVME, both) is None
    assert spill_target(Tier.CPU, {Tier.CPU}) is None
    assert spill_target(Tier.HBM, {Tier.NVME}) is Tier.NVME
    assert promote_target(Tier.NVME, both) is Tier.CPU
    assert promote_target(Tier.NVME, {Tier.NVME}) is None
    assert promote_target(Tier.CPU, both) is None


def test_slots_handed_out_in_order_then_lru_eviction() -> None:
    lru = SlotLRU(2)
    assert lru.allocate("a") == (0, None)
    assert lru.allocate("b") == (1, None)
    lru.touch("a")  # b is now the least recently used
    assert lru.allocate("c") == (1, ("b", 1))
    assert "b" not in lru and lru.slot_of("c") == 1 and len(lru) == 2


def test_pinned_keys_are_never_evicted() -> None:
    lru = SlotLRU(2)
    lru.allocate("p", pinned=True)
    lru.allocate("a")
    assert lru.allocate("b", pinned=True) == (1, ("a", 1))
    with pytest.raises(TierFullError):
        lru.allocate("c")  # both slots pinned
    assert lru.lru_keys() == []
    lru.remove("p")
    assert lru.can_allocate()


def test_remove_frees_the_slot() -> None:
    lru = SlotLRU(1)
    lru.allocate("a")
    assert lru.remove("a") == 0 and lru.remove("a") is None
    assert lru.allocate("b") == (0, None)


def test_zero_slots() -> None:
    lru = SlotLRU(0)
    assert not lru.can_allocate()
    with pytest.raises(TierFullError):
        lru.allocate("a")
