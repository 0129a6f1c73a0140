"""Fused rotary embedding + KV store against apply_rope_ref + store_kv_ref."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.rope_kv_store import rope_kv_store, rope_kv_store_ref
from tests.kernels.kernel_cases import (
    DEVICE,
    DTYPES,
    FP8_DTYPES,
    FP8_SCALES,
    HAS_CUDA,
    assert_close,
    rope_cache,
)


def _inputs(
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    num_blocks: int,
    block_size: int,
    first_block: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """q/k/v as strided views of one qkv projection; distinct slots, one padded row (-1)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.empty(num_tokens, width, dtype=dtype, device=DEVICE).normal_(generator=gen)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1
    )
    cpu_gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm((num_blocks - first_block) * block_size, generator=cpu_gen)[:num_tokens]
    slots += first_block * block_size
    slots[num_tokens // 2] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return dict(
        query=q.view(num_tokens, num_heads, head_dim),
        key=k.view(num_tokens, num_kv_heads, head_dim),
        value=v.view(num_tokens, num_kv_heads, head_dim),
        positions=torch.randint(0, 4096, (num_tokens,), generator=cpu_gen).to(DEVICE),
        cos_sin_cache=rope_cache(4096, head_dim),
        slot_mapping=slots.to(DEVICE),
        k_cache=torch.empty(shape, dtype=dtype, device=DEVICE).normal_(generator=gen),
        v_cache=torch.empty(shape, dtype=dtype, device=DEVICE).normal_(generator=gen),
    )


def _check(args: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    ref_args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    query_before = args["query"].clone()
    out = rope_kv_store(**args)
    ref = rope_kv_store_ref(**ref_args)
    assert_close(out, ref, dtype)
    assert_close(args["k_cache"], ref_args["k_cache"], dtype)
    torch.testing.assert_close(args["v_cache"], ref_args["v_cache"], atol=0, rtol=0)  # a plain copy
    torch.testing.assert_close(args["query"], query_before, atol=0, rtol=0)  # inputs untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(2, 2, 64), (8, 2, 64), (8, 1, 128)])
def test_matches_reference(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    _check(
        _inputs(12, num_heads, num_kv_heads, head_dim, dtype, num_blocks=4, block_size=16), dtype
    )


def test_padded_rows_leave_cache_untouched() -> None:
    args = _inputs(6, 4, 2, 64, torch.float32, num_blocks=3, block_size=16)
    args["slot_mapping"].fill_(-1)
    before = args["k_cache"].clone(), args["v_cache"].clone()
    rope_kv_store(**args)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


def test_rejects_bad_arguments() -> None:
    args = _inputs(4, 4, 2, 64, torch.float32, num_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_kv_store(**dict(args, slot_mapping=args["slot_mapping"].int()))
    with pytest.raises(ValueError, match="cos_sin_cache"):
        rope_kv_store(**dict(args, cos_sin_cache=args["cos_sin_cache"][:, :32].contiguous()))
    with pytest.raises(ValueError, match="positions"):
        rope_kv_store(**dict(args, positions=args["positions"][:3]))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        rope_kv_store(**dict(args, query=args["query"].transpose(1, 2)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(32, 32, 128), (32, 8, 128), (64, 8, 128), (16, 4, 64)]
)
def test_full_shapes_gpu(
    dtype: torch.dtype, block_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    _check(
        _inputs(
            4096, num_heads, num_kv_heads, head_dim, dtype, num_blocks=600, block_size=block_size
        ),
        dtype,
    )


@pytest.mark.gpu
def test_cache_beyond_int32_offsets_gpu() -> None:
    """Slots past element 2^31 of a > 2^31-element cache are written where the reference writes."""
    block_size, num_kv_heads, head_dim = 16, 8, 128
    first_block = 2**31 // (block_size * num_kv_heads * head_dim) + 1
    args = _inputs(
        256, 32, num_kv_heads, head_dim, torch.bfloat16, first_block + 40, block_size, first_block
    )
    assert args["k_cache"].numel() > 2**31
    _check(args, torch.bfloat16)


def _check_fp8(args: dict[str, torch.Tensor], dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    """The fused store into an FP8 cache equals `quantize_kv` of the reference's rotated k and
    v: on the interpreter byte for byte where the rotated key rounds the same (float32,
    float16); bfloat16 (the interpreter truncates when it narrows the rotated key) and CUDA
    (its float32 division may differ by an ulp) within one FP8 step."""
    args = dict(args, k_cache=args["k_cache"].to(kv_dtype), v_cache=args["v_cache"].to(kv_dtype))
    ref_args = dict(args, k_cache=args["k_cache"].clone(), v_cache=args["v_cache"].clone())
    k_scale, v_scale = FP8_SCALES
    out = rope_kv_store(**args, k_scale=k_scale, v_scale=v_scale)
    ref = rope_kv_store_ref(**ref_args, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref, dtype)
    if not HAS_CUDA and dtype != torch.bfloat16:
        for name in ("k_cache", "v_cache"):
            assert torch.equal(args[name].view(torch.uint8), ref_args[name].view(torch.uint8))
        return
    step = torch.finfo(kv_dtype).eps  # one FP8 step, relative
    for name, scale in (("k_cache", k_scale), ("v_cache", v_scale)):
        stored, expected = args[name].float() * scale, ref_args[name].float() * scale
        torch.testing.assert_close(stored, expected, rtol=step, atol=scale * 2.0**-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES)
def test_fp8_cache_matches_reference(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    _check_fp8(_inputs(12, 8, 2, 64, dtype, num_blocks=4, block_size=16), dtype, kv_dtype)


def test_fp8_store_clamps_and_rounds_to_nearest_even() -> None:
    """Values past the format's range saturate (no NaN); ties go to the even neighbour."""
    args = _inputs(4, 2, 2, 64, torch.float32, num_blocks=1, block_size=16)
    args["slot_mapping"] = torch.arange(4, device=DEVICE)
    ties = torch.tensor([84.0, -84.0, 1e6, -1e6, 124.5, 0.0], device=DEVICE)  # 84: between 80, 88
    args["value"] = ties.repeat(4, 2, 11)[:, :, :64].contiguous()
    args = dict(args, k_cache=args["k_cache"].to(torch.float8_e4m3fn))
    args["v_cache"] = args["v_cache"].to(torch.float8_e4m3fn)
    rope_kv_store(**args)
    stored = args["v_cache"][0, 0, 0, :6].float().tolist()
    assert stored == [80.0, -80.0, 448.0, -448.0, 128.0, 0.0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_dtype", FP8_DTYPES)
def test_fp8_full_shapes_gpu(dtype: torch.dtype, kv_dtype: torch.dtype) -> None:
    _check_fp8(_inputs(4096, 32, 8, 128, dtype, num_blocks=600, block_size=16), dtype, kv_dtype)
