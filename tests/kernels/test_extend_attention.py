"""Extend (prefill) attention over the paged cache against the float32 torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.extend_attention import (
    ExtendConfig,
    choose_extend_splits,
    default_config,
    extend_attention,
    extend_attention_ref,
)
from tests.kernels.kernel_cases import (
    DTYPES,
    FP8_DTYPES,
    FP8_SCALES,
    PagedBatch,
    assert_close,
    fp8_batch,
    make_paged_batch,
)

SHAPES = [(1, 16, 64), (4, 32, 64), (8, 16, 128)]  # (gqa group, block_size, head_dim)
# (new tokens, context) per request: decode row, first token of a prompt, full prefill without
# prefix, chunk after a cached prefix, chunk ending mid-page after an earlier chunk.
CPU_Q_LENS = [1, 1, 37, 20, 16]
CPU_SEQ_LENS = [40, 1, 37, 70, 83]


def _run(
    batch: PagedBatch, config: ExtendConfig | None = None, num_splits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    meta, scale = batch.meta, batch.query.shape[-1] ** -0.5
    tables = (meta.block_tables, meta.query_start_loc, meta.seq_lens)
    out = extend_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        *tables,
        scale,
        meta.max_query_len,
        config,
        num_splits=num_splits,
    )
    ref = extend_attention_ref(
        batch.query.float(), batch.k_cache.float(), batch.v_cache.float(), *tables, scale
    )
    return out, ref


def _batch(
    group: int,
    block_size: int,
    head_dim: int,
    dtype: torch.dtype,
    q_lens: list[int],
    seq_lens: list[int],
    **kw,
) -> PagedBatch:
    num_kv_heads = 2 if group == 1 else 1  # few heads: the interpreter runs programs one by one
    return make_paged_batch(
        q_lens, seq_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype, **kw
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,block_size,head_dim", SHAPES)
def test_matches_reference(dtype: torch.dtype, group: int, block_size: int, head_dim: int) -> None:
    batch = _batch(group, block_size, head_dim, dtype, CPU_Q_LENS, CPU_SEQ_LENS)
    out, ref = _run(batch)
    assert out.dtype == dtype and out.shape == batch.query.shape
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    "config", [ExtendConfig(16, 32, 4, 1), ExtendConfig(32, 16, 4, 1), ExtendConfig(32, 32, 4, 1)]
)
def test_tile_shapes_agree(config: ExtendConfig) -> None:
    """Query tiles wider and narrower than key tiles move the masked diagonal band around."""
    batch = make_paged_batch([45, 3, 70], [45, 90, 100], 4, 2, 64, 16, torch.float32, seed=2)
    out, ref = _run(batch, config)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 3, 8])
def test_key_splits_match_reference(dtype: torch.dtype, num_splits: int) -> None:
    """Short queries over long contexts, their key tiles split over programs: splits that get no
    tile (8 splits of a 40-token context), a request whose only tile is the diagonal, a decode row."""
    batch = make_paged_batch([16, 3, 1, 9], [300, 3, 40, 133], 4, 2, 64, 16, dtype, seed=3)
    out, ref = _run(batch, ExtendConfig(16, 32, 4, 1), num_splits)
    assert_close(out, ref, dtype)
    unsplit, _ = _run(batch, ExtendConfig(16, 32, 4, 1), 1)
    assert_close(out, unsplit.float(), dtype)


def test_extend_splits_only_for_short_queries_over_long_contexts() -> None:
    assert choose_extend_splits(16, 4096, 32, 1, 16, 132) == 8  # a prefix hit's 16-token tail
    assert choose_extend_splits(16, 300, 32, 1, 16, 132) == 1  # short context
    assert choose_extend_splits(4096, 4096, 32, 1, 128, 132) == 1  # a full prefill fills the GPU
    assert choose_extend_splits(16, 4096, 32, 64, 16, 132) == 1  # a wide batch does too


def test_default_config_prefers_small_query_tiles_for_short_queries() -> None:
    assert (
        default_config(128, 1, on_cuda=True).block_m
        < default_config(128, 4096, on_cuda=True).block_m
    )


def test_rejects_bad_arguments() -> None:
    batch = _batch(4, 16, 64, torch.float32, [3, 2], [5, 9])
    meta, q = batch.meta, batch.query
    caches = (batch.k_cache, batch.v_cache)
    with pytest.raises(ValueError, match="query_start_loc"):
        extend_attention(
            q, *caches, meta.block_tables, meta.query_start_loc[:2], meta.seq_lens, 0.1, 3
        )
    with pytest.raises(ValueError, match="head_dim"):
        extend_attention(
            q[..., :48].contiguous(),
            batch.k_cache[..., :48].contiguous(),
            batch.v_cache[..., :48].contiguous(),
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            0.1,
            3,
        )
    with pytest.raises(ValueError, match="num_splits"):
        extend_attention(
            q, *caches, meta.block_tables, meta.query_start_loc, meta.seq_lens, 0.1, 3, num_splits=0
        )
    with pytest.raises(ValueError, match="v_cache"):
        extend_attention(
            q,
            batch.k_cache,
            batch.v_cache[:1],
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            0.1,
            3,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_full_shapes_gpu(dtype: torch.dtype, block_size: int, group: int, head_dim: int) -> None:
    """Full prefill of 4k, a 1k chunk after a 3k prefix, a 300-token chunk, decode rows."""
    q_lens = [4096, 1024, 300, 1, 1]
    seq_lens = [4096, 4096, 1000, 2000, 1]
    batch = make_paged_batch(q_lens, seq_lens, 8 * group, 8, head_dim, block_size, dtype)
    out, ref = _run(batch)
    assert_close(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_short_queries_over_long_context_split_gpu(dtype: torch.dtype) -> None:
    """A prefix hit's tail (16 new tokens over 4k cached), split as the launcher chooses."""
    batch = make_paged_batch([16, 1, 7], [4096, 3000, 5000], 32, 8, 128, 16, dtype)
    meta, scale = batch.meta, batch.query.shape[-1] ** -0.5
    tables = (meta.block_tables, meta.query_start_loc, meta.seq_lens)
    out = extend_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        *tables,
        scale,
        meta.max_query_len,
        max_seq_len=meta.max_seq_len,
    )
    ref = extend_attention_ref(
        batch.query.float(), batch.k_cache.float(), batch.v_cache.float(), *tables, scale
    )
    assert_close(out, ref, dtype)


@pytest.mark.gpu
def test_cache_beyond_int32_offsets_gpu() -> None:
    """A cache of more than 2^31 elements, the requests' blocks past element 2^31."""
    block_size, num_kv_heads, head_dim = 16, 8, 128
    first_block = 2**31 // (block_size * num_kv_heads * head_dim) + 1
    batch = make_paged_batch(
        [200, 1],
        [600, 1000],
        32,
        num_kv_heads,
        head_dim,
        block_size,
        torch.bfloat16,
        first_block_id=first_block,
    )
    assert batch.k_cache.numel() > 2**31
    out, ref = _run(batch)
    assert_close(out, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_fp8_cache_matches_dequantized_reference(
    dtype: torch.dtype, kv_dtype: torch.dtype, num_splits: int
) -> None:
    """Prefill, chunk-after-prefix and decode rows over an FP8 cache equal the float32 reference
    over `stored * scale` (split partials carry v_scale too)."""
    batch = fp8_batch(_batch(4, 16, 64, dtype, [1, 37, 20], [40, 37, 70], seed=6), kv_dtype)
    meta, scale = batch.meta, batch.query.shape[-1] ** -0.5
    k_scale, v_scale = FP8_SCALES
    tables = (meta.block_tables, meta.query_start_loc, meta.seq_lens)
    out = extend_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        *tables,
        scale,
        meta.max_query_len,
        num_splits=num_splits,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    ref = extend_attention_ref(
        batch.query.float(), batch.k_cache, batch.v_cache, *tables, scale, k_scale, v_scale
    )
    assert_close(out, ref, dtype)


def test_fp8_cache_checks_still_apply() -> None:
    """The shared launcher checks (GQA heads, head_dim, table dtypes) hold for FP8 caches."""
    batch = fp8_batch(_batch(4, 16, 64, torch.float32, [3], [9]), torch.float8_e4m3fn)
    meta = batch.meta
    tables = (meta.block_tables, meta.query_start_loc, meta.seq_lens)
    with pytest.raises(ValueError, match="query"):
        extend_attention(batch.query[:, :3], batch.k_cache, batch.v_cache, *tables, 1.0, 3)
    with pytest.raises(ValueError, match="block_tables"):
        bad = (meta.block_tables.long(), meta.query_start_loc, meta.seq_lens)
        extend_attention(batch.query, batch.k_cache, batch.v_cache, *bad, 1.0, 3)
    with pytest.raises(ValueError, match="k_scale/v_scale"):
        extend_attention(batch.query, batch.k_cache, batch.v_cache, *tables, 1.0, 3, v_scale=-1.0)
