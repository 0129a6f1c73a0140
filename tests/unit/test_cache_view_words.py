"""Block reads and writes move 8-byte words where the layout allows, and the bytes are exact."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.cache_view import KVCacheView, TPLayout, _as_words


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_word_view_round_trip_with_head_and_layer_slices(dtype: torch.dtype) -> None:
    cache = torch.randn(4, 2, 9, 16, 4, 64).to(dtype)
    view = KVCacheView(cache, TPLayout(0, 1, 4))
    assert _as_words(cache[1:3][..., 1:3, :]).dtype == torch.int64  # the fast path engages
    blocks = [7, 2, 5]
    data = view.read_blocks(blocks, heads=(1, 3), layers=(1, 3))
    assert torch.equal(data, cache[1:3, :, blocks][..., 1:3, :])
    fresh = torch.randn_like(data.float()).to(dtype)
    view.write_blocks([3, 8, 1], fresh, heads=(1, 3), layers=(1, 3))
    assert torch.equal(cache[1:3, :, [3, 8, 1]][..., 1:3, :], fresh)


def test_odd_layouts_fall_back_to_elements() -> None:
    cache = torch.randn(2, 2, 5, 4, 3, 3, dtype=torch.float16)  # 6-byte rows: no words
    assert _as_words(cache).dtype == torch.float16
    view = KVCacheView(cache)
    assert torch.equal(view.read_blocks([4, 1]), cache[:, :, [4, 1]])


def test_one_index_serves_every_layer_range() -> None:
    cache = torch.randn(4, 2, 9, 16, 2, 8)
    view = KVCacheView(cache)
    blocks = [6, 1, 3]
    index = view.block_index(blocks)
    parts = [view.read_indexed(index, layers=(l0, l1)) for l0, l1 in [(0, 1), (1, 3), (3, 4)]]
    assert torch.equal(torch.cat(parts), view.read_blocks(blocks))
    view.write_indexed(view.block_index([2, 8, 5]), parts[1], layers=(1, 3))
    assert torch.equal(cache[1:3, :, [2, 8, 5]], cache[1:3, :, blocks])
