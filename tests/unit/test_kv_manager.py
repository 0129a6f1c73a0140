"""KVManager: slot allocation, prefix hits (never the whole prompt), salts, stats."""

from __future__ import annotations

import pytest

from engine.kv.block_hash import hash_blocks
from engine.kv.kv_manager import NO_BLOCKS, KVManager, token_slice
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 16


def make_request(request_id: str, tokens: list[int]) -> Request:
    return Request(request_id, list(tokens), SamplingParams())


def run_prefill(kv: KVManager, request: Request) -> None:
    """Admit with whatever prefix hit exists and compute the rest, like one scheduler step."""
    computed = kv.get_computed_blocks(request)
    n = request.num_tokens - computed.num_tokens
    assert kv.can_allocate_slots(request, n, computed)
    kv.allocate_slots(request, n, computed)
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request)
    kv.pool.check_integrity()


def test_token_slice_matches_all_token_ids() -> None:
    r = make_request("r", list(range(10)))
    r.output_token_ids.extend([100, 101, 102])
    for start in range(14):
        for end in range(start, 14):
            assert token_slice(r, start, end) == r.all_token_ids[start:end]


def test_allocate_slots_grows_table_block_by_block() -> None:
    kv = KVManager(num_blocks=8, block_size=BS, salt="m")
    r = make_request("r", list(range(20)))
    kv.allocate_slots(r, 20)
    assert len(r.block_ids) == 2
    r.num_computed_tokens = 20
    r.output_token_ids.append(7)
    kv.allocate_slots(r, 1)  # token 21 still fits block 2
    assert len(r.block_ids) == 2
    r.num_computed_tokens = 32
    kv.allocate_slots(r, 1)  # position 32 opens a third block
    assert len(r.block_ids) == 3
    assert kv.num_free_blocks == 7 - 3
    kv.free(r)
    assert r.block_ids == [] and kv.num_free_blocks == 7
    kv.pool.check_integrity()


def test_can_allocate_slots_respects_pool_and_watermark() -> None:
    kv = KVManager(num_blocks=5, block_size=BS, salt="m")  # 4 usable
    r = make_request("r", list(range(64)))
    assert kv.can_allocate_slots(r, 64)
    assert not kv.can_allocate_slots(r, 65)
    assert not kv.can_allocate_slots(r, 64, NO_BLOCKS, num_reserved_blocks=1)
    assert kv.can_allocate_slots(r, 48, NO_BLOCKS, num_reserved_blocks=1)
    with pytest.raises(RuntimeError):
        kv.allocate_slots(r, 65)


def test_shared_prefix_hits_the_same_blocks() -> None:
    kv = KVManager(num_blocks=16, block_size=BS, salt="m")
    shared = list(range(1000, 1040))  # 2 full blocks + 8 tokens
    a = make_request("a", shared + [1, 2, 3])
    run_prefill(kv, a)
    b = make_request("b", shared + [9, 9, 9, 9])
    computed = kv.get_computed_blocks(b)
    assert computed.block_ids == a.block_ids[:2]
    assert computed.num_tokens == 32
    run_prefill(kv, b)
    assert b.block_ids[:2] == a.block_ids[:2]
    assert b.block_ids[2] != a.block_ids[2]
    assert kv.pool.ref_count(a.block_ids[0]) == 2
    assert kv.prefix_hit_tokens == 32
    assert kv.prefix_queried_tokens == a.num_tokens + b.num_tokens
    kv.free(a)
    assert kv.pool.ref_count(b.block_ids[0]) == 1  # b still holds the shared prefix
    kv.free(b)
    assert kv.num_free_blocks == kv.num_usable_blocks
    kv.pool.check_integrity()


@pytest.mark.parametrize(
    ("num_tokens", "expected_blocks"), [(48, 2), (49, 3), (47, 2), (16, 0), (17, 1), (1, 0)]
)
def test_identical_prompt_never_hits_whole_prompt(num_tokens: int, expected_blocks: int) -> None:
    kv = KVManager(num_blocks=16, block_size=BS, salt="m")
    tokens = list(range(500, 500 + num_tokens))
    run_prefill(kv, make_request("a", tokens))
    computed = kv.get_computed_blocks(make_request("b", tokens))
    assert len(computed.block_ids) == expected_blocks
    assert computed.num_tokens == expected_blocks * BS < num_tokens


def test_hit_survives_free_until_evicted() -> None:
    kv = KVManager(num_blocks=4, block_size=BS, salt="m")  # 3 usable
    tokens = list(range(40))
    a = make_request("a", tokens)
    run_prefill(kv, a)
    kv.free(a)
    b = make_request("b", tokens)
    computed = kv.get_computed_blocks(b)
    assert len(computed.block_ids) == 2  # cached free blocks still hit
    # Reviving the 2 cached free blocks plus 1 new block consumes the whole pool.
    assert kv.can_allocate_slots(b, 8, computed)
    assert not kv.can_allocate_slots(b, 8, computed, num_reserved_blocks=1)
    # Someone else takes every block: the cached ones are evicted and the hit is gone.
    c = make_request("c", list(range(900, 948)))
    kv.allocate_slots(c, 48)
    assert kv.get_computed_blocks(b).block_ids == []
    kv.pool.check_integrity()


def test_cache_blocks_counts_output_tokens() -> None:
    kv = KVManager(num_blocks=8, block_size=BS, salt="m")
    a = make_request("a", list(range(10)))
    kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_blocks(a)
    assert kv.pool.num_cached_blocks == 0  # no full block yet
    for t in range(10):
        a.output_token_ids.append(200 + t)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_blocks(a)
    assert a.num_computed_tokens == 20
    expected = hash_blocks(a.all_token_ids, BS, "m")
    assert a.block_hashes == expected and len(expected) == 1
    assert kv.pool.lookup(expected[0]) == a.block_ids[0]
    # A new request whose prompt is a's prompt + outputs hits that block.
    b = make_request("b", a.all_token_ids + [1])
    assert kv.get_computed_blocks(b).block_ids == [a.block_ids[0]]


def test_hashes_depend_on_salt() -> None:
    tokens = list(range(300, 340))
    kv = KVManager(num_blocks=8, block_size=BS, salt="llama-3-8b")
    a = make_request("a", tokens)
    run_prefill(kv, a)
    assert a.block_hashes == hash_blocks(tokens, BS, "llama-3-8b")
    other_salt = hash_blocks(tokens, BS, "qwen2-7b")
    assert all(kv.pool.lookup(bh) is None for bh in other_salt)
    # Another engine (another salt) over the same tokens misses entirely.
    kv2 = KVManager(num_blocks=8, block_size=BS, salt="qwen2-7b")
    run_prefill(kv2, make_request("x", list(range(900, 940))))
    b = make_request("b", tokens + [5])
    assert kv2.get_computed_blocks(b).block_ids == []
    assert b.block_hashes[:2] == other_salt
    assert kv.get_computed_blocks(make_request("c", tokens + [5])).num_tokens == 32


def test_caching_disabled_never_hits_and_counts_nothing() -> None:
    kv = KVManager(num_blocks=8, block_size=BS, salt="m", enable_caching=False)
    tokens = list(range(40))
    run_prefill(kv, make_request("a", tokens))
    assert kv.get_computed_blocks(make_request("b", tokens)) == NO_BLOCKS
    assert kv.prefix_queried_tokens == 0 and kv.prefix_hit_tokens == 0


def test_eviction_callback_reports_hash() -> None:
    evicted: list[tuple[int, bytes]] = []
    kv = KVManager(
        num_blocks=3, block_size=BS, salt="m", on_evict=lambda b, bh: evicted.append((b, bh))
    )
    a = make_request("a", list(range(33)))
    kv.allocate_slots(a, 32)
    a.num_computed_tokens = 32
    kv.cache_blocks(a)
    table = list(a.block_ids)
    kv.free(a)
    kv.allocate_slots(make_request("c", [1]), 1)
    hashes = hash_blocks(list(range(32)), BS, "m")
    assert evicted == [(table[1], hashes[1])]  # the tail goes before the prefix
    assert kv.pool.lookup(hashes[0]) == table[0]
