"""Tiered store: bit-exact round trips, corruption, unwritable dirs, LRU, key mismatch, prefix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.kv.block_hash import hash_blocks
from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import TierFullError
from kvtransfer.tiers.placement import Tier
from kvtransfer.tiers.store import TieredStore

L, N, BS, H, D = 2, 16, 4, 2, 8


def view(fill: bool = True, dtype: torch.dtype = torch.bfloat16) -> KVCacheView:
    t = (
        torch.randn(L, 2, N, BS, H, D).to(dtype)
        if fill
        else torch.zeros(L, 2, N, BS, H, D, dtype=dtype)
    )
    return KVCacheView(t)


def hashes(n: int, salt: str = "m") -> list[bytes]:
    return hash_blocks(list(range(n * BS)), BS, salt)


def make(
    tmp_path: Path, src: KVCacheView, cpu_blocks: int, nvme_blocks: int = 64, salt: str = "m"
) -> TieredStore:
    per = src.bytes_per_block()
    return TieredStore(
        src,
        model_salt=salt,
        cpu_bytes=cpu_blocks * per,
        nvme_dir=tmp_path / "nvme",
        nvme_bytes=nvme_blocks * (per + 64),
    )


def test_round_trip_hbm_cpu_nvme_back_is_bit_exact(tmp_path: Path) -> None:
    src, dst = view(), view(fill=False)
    store = make(tmp_path, src, cpu_blocks=2)
    hs = hashes(6)
    assert store.store(hs, src, [1, 3, 5, 7, 9, 11]) == 6
    store.flush()
    tiers = [t for t, _ in store.lookup_prefix(hs)]
    assert tiers == [Tier.NVME] * 4 + [Tier.CPU] * 2  # the 4 oldest spilled to NVMe
    assert store.load(hs, dst, [2, 4, 6, 8, 10, 12]) == 6
    assert torch.equal(dst.read_blocks([2, 4, 6, 8, 10, 12]), src.read_blocks([1, 3, 5, 7, 9, 11]))
    stats = store.stats()
    # promoting the 4 NVMe hits into the 2-slot CPU tier pushes the CPU blocks down in turn
    assert stats[Tier.NVME].hits + stats[Tier.CPU].hits == 6 and stats[Tier.NVME].hits >= 4
    assert stats[Tier.CPU].evictions >= 4
    store.close()


def test_corrupted_nvme_byte_is_a_miss_and_dropped(tmp_path: Path) -> None:
    src, dst = view(), view(fill=False)
    store = make(tmp_path, src, cpu_blocks=1)
    hs = hashes(2)
    store.store(hs, src, [1, 2])
    store.flush()
    (f,) = list((tmp_path / "nvme").glob("*.kvb"))
    raw = bytearray(f.read_bytes())
    raw[-7] ^= 0x01
    f.write_bytes(bytes(raw))
    assert store.load(hs, dst, [3, 4]) == 0  # block 0 of the chain was on NVMe: corrupt -> miss
    assert not f.exists() and store.lookup_prefix(hs) == []
    assert store.stats()[Tier.NVME].failures == 1
    store.close()


@pytest.mark.parametrize("how", ["chmod", "under_a_file"])
def test_unwritable_nvme_dir_degrades_to_misses(tmp_path: Path, how: str) -> None:
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o000)
    else:
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "nvme"
    src, dst = view(), view(fill=False)
    per = src.bytes_per_block()
    store = TieredStore(src, model_salt="m", cpu_bytes=per, nvme_dir=target, nvme_bytes=64 * per)
    hs = hashes(3)
    assert store.store(hs, src, [1, 2, 3]) == 3  # never raises
    store.flush()
    assert [t for t, _ in store.lookup_prefix(hs)] == []  # block 0 and 1 were lost, not served
    assert store.load(hs[2:], dst, [4]) == 1  # the CPU tier still works
    assert store.stats()[Tier.NVME].failures >= 1
    store.close()


def test_full_cpu_budget_evicts_lru_without_nvme(tmp_path: Path) -> None:
    src = view()
    per = src.bytes_per_block()
    store = TieredStore(src, model_salt="m", cpu_bytes=3 * per)
    hs = hashes(4)
    store.store(hs[:3], src, [1, 2, 3])
    store.load(hs[:1], view(fill=False), [5])  # touch block 0: block 1 is now the LRU
    store.store(hs[3:], src, [4])
    present = {h for h in hs if store.lookup_prefix([h])}
    assert present == {hs[0], hs[2], hs[3]}
    assert store.stats()[Tier.CPU].blocks == 3 and store.stats()[Tier.CPU].evictions == 1
    store.close()


def test_salt_or_spec_mismatch_is_a_miss(tmp_path: Path) -> None:
    src = view()
    per = src.bytes_per_block()
    store = TieredStore(src, model_salt="model-a", cpu_bytes=4 * per)
    other_salt = TieredStore(src, model_salt="model-b", cpu_bytes=4 * per)
    other_spec = TieredStore(src, model_salt="model-a", cpu_bytes=4 * per, spec_version=2)
    hs = hashes(2, salt="model-a")
    for s in (store, other_salt, other_spec):
        s.store(hs, src, [1, 2])
    assert store.key(hs[0]) != other_salt.key(hs[0]) != other_spec.key(hs[0])
    # the same hash bytes under a different salt/spec land under different keys: no cross hit
    assert other_salt.key(hs[0]) not in store.cpu and other_spec.key(hs[0]) not in store.cpu
    f32 = TieredStore(view(dtype=torch.float32), model_salt="model-a", cpu_bytes=8 * per)
    assert f32.lookup_prefix(hs) == [] and len(store.lookup_prefix(hs)) == 2
    for s in (store, other_salt, other_spec, f32):
        s.close()


def test_longest_prefix_across_tiers_stops_at_first_gap(tmp_path: Path) -> None:
    src = view()
    store = make(tmp_path, src, cpu_blocks=2)
    hs = hashes(5)
    store.store(hs[:3], src, [1, 2, 3])  # hs[0] spills to NVMe
    store.store(hs[4:], src, [5])  # hs[1] spills; hs[3] never stored
    store.flush()
    found = store.lookup_prefix(hs)
    assert found == [(Tier.NVME, hs[0]), (Tier.NVME, hs[1]), (Tier.CPU, hs[2])]
    store.close()


def test_swap_round_trip_is_exact_and_pinned(tmp_path: Path) -> None:
    src, dst = view(), view(fill=False)
    per = src.bytes_per_block()
    store = TieredStore(src, model_salt="m", cpu_bytes=3 * per)
    handle = store.swap_out(src, [4, 9])
    store.store(hashes(3), src, [1, 2, 3])  # cache pressure must not evict swapped blocks
    with pytest.raises(TierFullError):
        store.swap_out(src, [5, 6])
    store.swap_in(handle, dst, [7, 8])
    assert torch.equal(dst.read_blocks([7, 8]), src.read_blocks([4, 9]))
    assert store.stats()[Tier.CPU].blocks == 1
    store.close()


def test_background_spill_keeps_evicted_bytes_when_blocks_are_reused_at_once(
    tmp_path: Path,
) -> None:
    src = view()
    evicted = src.read_blocks([1, 2, 3, 4, 5])
    per = src.bytes_per_block()
    store = TieredStore(
        src, model_salt="m", cpu_bytes=8 * per, max_staging_bytes=2 * per
    )  # 3 batches
    hs = hashes(5)
    assert store.spill(hs, src, [1, 2, 3, 4, 5]) == 5
    src.kv_cache[:, :, 1:6] = 7.0  # the engine reuses the blocks right after evicting them
    assert store.spill(hs, src, [1, 2, 3, 4, 5]) == 0  # in flight or landed: never copied twice
    store.flush()
    dst = view(fill=False)
    assert store.load(hs, dst, [6, 7, 8, 9, 10]) == 5
    assert torch.equal(dst.read_blocks([6, 7, 8, 9, 10]), evicted)
    store.close()


def test_a_failed_spill_is_never_served_and_gives_its_slots_back(tmp_path: Path) -> None:
    from kvtransfer.tiers.cpu import CpuTier

    tier = CpuTier(64, 4 * 64, pin_memory=False)
    slots, _ = tier.reserve(["a", "b"])
    assert len(slots) == 2 and tier.holds("a") and "a" not in tier
    tier.unreserve(["a", "b"])  # what the store does with a spill whose copy raised
    assert not tier.holds("a") and not tier.holds("b") and tier.lru.num_evictable() == 4
    slots, _ = tier.reserve(["c", "d", "e", "f"])
    assert len(slots) == 4
