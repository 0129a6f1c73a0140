"""BlockPool: allocation, ref counts, the LRU of cached free blocks, eviction, integrity."""

from __future__ import annotations

import pytest

from engine.kv.block_pool import NULL_BLOCK_ID, BlockPool


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


class Recorder:
    def __init__(self) -> None:
        self.evicted: list[tuple[int, bytes]] = []

    def __call__(self, block_id: int, block_hash: bytes) -> None:
        self.evicted.append((block_id, block_hash))


def checked(pool: BlockPool) -> BlockPool:
    pool.check_integrity()
    return pool


def test_fresh_pool_counts_and_null_block() -> None:
    pool = checked(BlockPool(8))
    assert pool.num_usable_blocks == 7
    assert pool.num_free_blocks == 7
    assert pool.usage() == 0.0
    ids = pool.allocate(7)
    checked(pool)
    assert sorted(ids) == list(range(1, 8))
    assert NULL_BLOCK_ID not in ids
    assert pool.usage() == 1.0
    assert not pool.can_allocate(1)
    assert pool.can_allocate(0)
    with pytest.raises(RuntimeError, match="can_allocate"):
        pool.allocate(1)
    checked(pool)


def test_refcounts_shared_block_freed_after_last_holder() -> None:
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    pool.cache_full_block(a, h(1))
    pool.touch([a])  # a second request shares it
    assert pool.ref_count(a) == 2
    pool.free([a])
    checked(pool)
    assert pool.ref_count(a) == 1
    assert pool.num_free_blocks == 2
    pool.free([a])
    checked(pool)
    assert pool.ref_count(a) == 0
    assert pool.num_free_blocks == 3
    assert pool.num_cached_free_blocks == 1
    with pytest.raises(AssertionError):
        pool.free([a])


def test_lookup_after_free_hits_and_touch_revives() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache_full_block(a, h(10))
    pool.free([a, b])
    checked(pool)
    assert pool.lookup(h(10)) == a
    assert pool.lookup(h(11)) is None
    free_before = pool.num_free_blocks
    pool.touch([a])
    checked(pool)
    assert pool.ref_count(a) == 1
    assert pool.num_free_blocks == free_before - 1
    assert a not in pool.allocate(pool.num_free_blocks)  # a is held, cannot be handed out
    checked(pool)


def test_plain_free_blocks_are_reused_before_cached_ones() -> None:
    rec = Recorder()
    pool = BlockPool(5, on_evict=rec)
    a, b, c, d = pool.allocate(4)
    pool.cache_full_block(a, h(1))
    pool.free([a, b, c, d])
    checked(pool)
    got = pool.allocate(3)
    assert a not in got and rec.evicted == []
    assert pool.lookup(h(1)) == a
    got += pool.allocate(1)
    assert got[-1] == a and rec.evicted == [(a, h(1))]
    assert pool.lookup(h(1)) is None
    checked(pool)


def test_lru_evicts_least_recently_freed_and_tail_before_prefix() -> None:
    rec = Recorder()
    pool = BlockPool(7, on_evict=rec)
    first = pool.allocate(3)  # one request's table: prefix ... tail
    second = pool.allocate(3)
    for i, block_id in enumerate(first + second):
        pool.cache_full_block(block_id, h(100 + i))
    pool.free(first)  # freed before `second`: evicted first, its tail before its prefix
    pool.free(second)
    checked(pool)
    order = [pool.allocate(1)[0] for _ in range(6)]
    checked(pool)
    assert order == first[::-1] + second[::-1]
    assert [bid for bid, _ in rec.evicted] == order
    assert all(pool.block_hash(bid) is None for bid in order)
    hashes = {bid: bh for bid, bh in rec.evicted}
    assert hashes[first[0]] == h(100) and hashes[second[2]] == h(105)


def test_touch_then_free_moves_block_to_lru_tail() -> None:
    rec = Recorder()
    pool = BlockPool(3, on_evict=rec)
    a, b = pool.allocate(2)
    pool.cache_full_block(a, h(1))
    pool.cache_full_block(b, h(2))
    pool.free([a])
    pool.free([b])  # LRU: a then b
    pool.touch([a])
    pool.free([a])  # a is now the most recently freed
    checked(pool)
    assert pool.allocate(1) == [b]
    assert rec.evicted == [(b, h(2))]


def test_cache_full_block_keeps_existing_mapping_on_duplicate_hash() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache_full_block(a, h(7))
    assert not pool.cache_full_block(b, h(7))
    assert not pool.cache_full_block(a, h(7))  # re-registering its own hash: no-op
    assert pool.lookup(h(7)) == a
    assert pool.block_hash(b) is None
    with pytest.raises(AssertionError):
        pool.cache_full_block(a, h(8))  # a block never changes its hash while held
    pool.free([a, b])
    checked(pool)
    assert pool.num_cached_free_blocks == 1
    with pytest.raises(AssertionError):
        pool.cache_full_block(a, h(9))  # free blocks cannot be registered


def test_caching_disabled_never_hits() -> None:
    pool = BlockPool(4, enable_caching=False)
    (a,) = pool.allocate(1)
    assert not pool.cache_full_block(a, h(1))
    pool.free([a])
    assert pool.lookup(h(1)) is None
    assert pool.num_cached_blocks == 0
    checked(pool)


def test_check_integrity_detects_corruption() -> None:
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    pool._ref_counts[a] = 0  # held block with no references, yet not free
    with pytest.raises(AssertionError):
        pool.check_integrity()
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    pool.cache_full_block(a, h(1))
    pool._hash_to_block[h(2)] = a  # the two maps disagree
    with pytest.raises(AssertionError):
        pool.check_integrity()
