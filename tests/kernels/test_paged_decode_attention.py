"""Paged decode attention (flash-decoding) against the float32 torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.paged_decode_attention import (
    choose_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
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

# (gqa group, block_size, head_dim): every GQA ratio, block size and head dim appears.
SHAPES = [(1, 16, 64), (4, 32, 64), (8, 16, 128)]
CPU_SEQ_LENS = [1, 37, 100]  # one token, a partial page, several pages


def _run(batch: PagedBatch, num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    meta, scale = batch.meta, batch.query.shape[-1] ** -0.5
    args = (batch.query, batch.k_cache, batch.v_cache, meta.block_tables, meta.seq_lens, scale)
    out = paged_decode_attention(*args, max_seq_len=meta.max_seq_len, num_splits=num_splits)
    ref = paged_decode_attention_ref(
        batch.query.float(), batch.k_cache.float(), batch.v_cache.float(), *args[3:]
    )
    return out, ref


def _decode_batch(
    group: int, block_size: int, head_dim: int, dtype: torch.dtype, seq_lens: list[int], **kw
) -> PagedBatch:
    num_kv_heads = 2 if group < 8 else 1
    return make_paged_batch(
        [1] * len(seq_lens),
        seq_lens,
        group * num_kv_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        **kw,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,block_size,head_dim", SHAPES)
def test_matches_reference(dtype: torch.dtype, group: int, block_size: int, head_dim: int) -> None:
    batch = _decode_batch(group, block_size, head_dim, dtype, CPU_SEQ_LENS)
    out, ref = _run(batch)
    assert out.dtype == dtype and out.shape == batch.query.shape
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_split_counts_agree(num_splits: int) -> None:
    """Splits that end mid-page, empty splits (seq_len 1 with 7 splits) and one split."""
    batch = _decode_batch(4, 16, 64, torch.float32, [1, 50, 129], seed=3)
    out, ref = _run(batch, num_splits=num_splits)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padded_row_with_empty_context_gives_zeros(num_splits: int) -> None:
    """CUDA-graph padding rows carry seq_len 0: zeros out, no NaN, other rows unaffected."""
    batch = _decode_batch(4, 16, 64, torch.float32, [20, 33], seed=4)
    meta, scale = batch.meta, 0.125
    seq_lens = meta.seq_lens.clone()
    seq_lens[0] = 0
    out = paged_decode_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        meta.block_tables,
        seq_lens,
        scale,
        33,
        num_splits=num_splits,
    )
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref = paged_decode_attention_ref(
        batch.query[1:], batch.k_cache, batch.v_cache, meta.block_tables[1:], seq_lens[1:], scale
    )
    assert_close(out[1:], ref, torch.float32)


def test_choose_num_splits_more_for_small_batches() -> None:
    assert choose_num_splits(1, 8, 4096, 132) > choose_num_splits(32, 8, 4096, 132)
    assert choose_num_splits(1, 8, 64, 132) == 1  # too short to be worth splitting
    assert choose_num_splits(512, 8, 32768, 132) == 1


def test_rejects_bad_arguments() -> None:
    batch = _decode_batch(4, 16, 64, torch.float32, [5, 9])
    meta, q = batch.meta, batch.query
    args = (batch.k_cache, batch.v_cache, meta.block_tables, meta.seq_lens, 0.125, 9)
    with pytest.raises(ValueError, match="query"):
        paged_decode_attention(q[:, :3], *args)  # 3 heads: not a multiple of 2 KV heads
    with pytest.raises(ValueError, match="k_cache"):
        paged_decode_attention(q.half(), *args)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(
            q, batch.k_cache, batch.v_cache, meta.block_tables.long(), meta.seq_lens, 0.125, 9
        )
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q[:1], *args)
    with pytest.raises(ValueError, match="must be contiguous"):
        paged_decode_attention(q.transpose(0, 1).contiguous().transpose(0, 1), *args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch_size", [1, 32])
@pytest.mark.gpu
def test_full_shapes_gpu(
    dtype: torch.dtype, block_size: int, group: int, head_dim: int, batch_size: int
) -> None:
    seq_lens = torch.randint(
        1, 4097, (batch_size,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    seq_lens[0] = 4096
    batch = make_paged_batch([1] * batch_size, seq_lens, 8 * group, 8, head_dim, block_size, dtype)
    out, ref = _run(batch)
    assert_close(out, ref, dtype)


@pytest.mark.gpu
def test_cache_beyond_int32_offsets_gpu() -> None:
    """A cache of more than 2^31 elements (~4.3 GB each for K and V): the request's blocks lie
    past element 2^31, so 32-bit offset arithmetic would read the wrong memory."""
    block_size, num_kv_heads, head_dim = 16, 8, 128
    first_block = 2**31 // (block_size * num_kv_heads * head_dim) + 1
    batch = make_paged_batch(
        [1, 1],
        [300, 1000],
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
@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_cache_matches_dequantized_reference(
    dtype: torch.dtype, kv_dtype: torch.dtype, num_splits: int
) -> None:
    """An FP8 cache read with its scales equals the float32 reference over `stored * scale`
    within the query dtype's tolerance (the kernel folds the scales; the values are the same)."""
    batch = fp8_batch(_decode_batch(4, 16, 64, dtype, CPU_SEQ_LENS, seed=5), kv_dtype)
    meta, scale = batch.meta, batch.query.shape[-1] ** -0.5
    k_scale, v_scale = FP8_SCALES
    tables = (meta.block_tables, meta.seq_lens, scale)
    out = paged_decode_attention(
        batch.query,
        batch.k_cache,
        batch.v_cache,
        *tables,
        meta.max_seq_len,
        num_splits=num_splits,
        k_scale=k_scale,
        v_scale=v_scale,
    )
    ref = paged_decode_attention_ref(
        batch.query.float(), batch.k_cache, batch.v_cache, *tables, k_scale, v_scale
    )
    assert out.dtype == dtype
    assert_close(out, ref, dtype)


def test_fp8_rejects_bad_scales_and_mixed_caches() -> None:
    batch = fp8_batch(_decode_batch(4, 16, 64, torch.float32, [5, 9]), torch.float8_e4m3fn)
    meta, q = batch.meta, batch.query
    tables = (meta.block_tables, meta.seq_lens, 0.125, 9)
    with pytest.raises(ValueError, match="k_scale/v_scale"):
        paged_decode_attention(q, batch.k_cache, batch.v_cache, *tables, k_scale=0.0)
    plain = _decode_batch(4, 16, 64, torch.float32, [5, 9])
    with pytest.raises(ValueError, match="k_scale/v_scale"):  # an unscaled cache takes none
        paged_decode_attention(q, plain.k_cache, plain.v_cache, *tables, v_scale=2.0)
    with pytest.raises(ValueError, match="v_cache"):
        paged_decode_attention(q, batch.k_cache, batch.v_cache.float(), *tables)
