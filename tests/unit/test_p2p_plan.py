"""The p2p transfer's message plan: covers every layer in order, keeps messages near 128 MiB and
at least 4 where that keeps them >= 4 MiB, and makes the first and last ones short."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvtransfer.transports.p2p_plan import CHUNK_BYTES, MIN_CHUNK_BYTES, MIN_CHUNKS, layer_chunks

MiB = 1 << 20


def _sizes(num_layers: int, num_bytes: int) -> list[float]:
    return [
        (l1 - l0) * num_bytes / num_layers / MiB for l0, l1 in layer_chunks(num_layers, num_bytes)
    ]


@given(st.integers(1, 160), st.integers(0, 16 << 30))
def test_messages_cover_every_layer_in_order(num_layers: int, num_bytes: int) -> None:
    chunks = layer_chunks(num_layers, num_bytes)
    assert chunks[0][0] == 0 and chunks[-1][1] == num_layers
    assert all(l0 < l1 for l0, l1 in chunks)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))


@given(st.integers(2, 160), st.integers(2 * MIN_CHUNK_BYTES, 16 << 30))
def test_enough_messages_and_none_small_but_the_ends(num_layers: int, num_bytes: int) -> None:
    chunks = layer_chunks(num_layers, num_bytes)
    per_layer = num_bytes / num_layers
    inner = [(l1 - l0) * per_layer for l0, l1 in chunks[1:-1]] or [
        (l1 - l0) * per_layer for l0, l1 in chunks
    ]
    assert len(chunks) >= min(MIN_CHUNKS, num_layers, num_bytes // MIN_CHUNK_BYTES)
    assert min(inner) >= min(MIN_CHUNK_BYTES, per_layer) * 0.999
    if per_layer <= CHUNK_BYTES / 2:  # layers small enough to make ~CHUNK_BYTES messages
        assert max(inner) <= 1.5 * max(CHUNK_BYTES, num_bytes / MIN_CHUNKS)


@pytest.mark.parametrize(
    ("tokens", "expected_mib"),
    [
        (1024, [8, 28, 28, 28, 28, 8]),  # 128 MiB: short ends, so the unhidden copies are small
        (4096, [32, 112, 112, 112, 112, 32]),  # 512 MiB
        (16384, [128] * 16),  # 2 GiB: two layers (64 MiB each) per message
    ],
)
def test_llama3_8b_plans(tokens: int, expected_mib: list[int]) -> None:
    num_bytes = tokens // 16 * (2 << 20)  # 2 MiB per 16-token block
    assert _sizes(32, num_bytes) == expected_mib


def test_small_transfers_go_in_one_message() -> None:
    assert layer_chunks(32, 2 * MIN_CHUNK_BYTES - 1) == [(0, 32)]
    assert layer_chunks(1, 1 << 30) == [(0, 1)]
    assert layer_chunks(2, 0) == [(0, 2)]


def test_prefill_decode_peers_pair_only_across_pools():
    from kvtransfer.pool_link import prefill_decode_peers

    assert prefill_decode_peers(["prefill", "prefill", "decode"]) == [(2,), (2,), (0, 1)]
    assert prefill_decode_peers(["decode", "prefill"]) == [(1,), (0,)]
    with pytest.raises(ValueError, match="colocated"):
        prefill_decode_peers(["prefill", "colocated"])
