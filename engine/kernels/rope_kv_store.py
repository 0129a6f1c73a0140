"""Rotary embedding fused with the KV-cache store.

One program per token: it rotates every query head and key head of the token (rotate-half, the
Llama / Hugging Face convention, in float32) and writes the rotated key and the value into the
token's cache slot. Equals `apply_rope_ref` on q and k followed by `store_kv_ref`.

The rotated queries go to a new tensor (the inputs are never mutated, per the AttentionBackend
contract); the rotated keys exist only in the cache. A slot of -1 skips the cache write (padded
rows). Hazard: positions must be < cos_sin_cache.shape[0]; they are not checked on the device.

FP8 caches (float8_e4m3fn / float8_e5m2): the rotated key (rounded to the input's dtype, as the
reference does) and the value are stored as `x / scale` (k_scale, v_scale: the layer's),
clamped to the format's largest finite value and cast, round to nearest even: `quantize_kv`.
Hazard: Triton's CPU interpreter narrows to FP8 wrongly (ties away from even, and a mantissa
carry lands in the wrong bits), so under the interpreter the kernel first rounds to the FP8
grid itself (`_round_to_fp8_grid`, exact) and the cast then only drops zero bits. On CUDA the
hardware conversion (round to nearest even, saturating) does it.
"""

from __future__ import annotations

import math

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.attention.torch_backend import FP8_KV_DTYPES, apply_rope_ref, store_kv_ref
from engine.kernels.checks import (
    FLOAT_DTYPES,
    check_head_dim,
    check_rows,
    check_same_device,
    check_tensor,
    interpreter_enabled,
    next_power_of_2,
)


@triton.jit
def _round_to_fp8_grid(y, MANT: tl.constexpr, EMIN: tl.constexpr):
    """float32 `y` (within the format's range) rounded to the nearest value with MANT mantissa
    bits and smallest normal exponent EMIN, ties to even: the interpreter's exact FP8 cast."""
    bits = y.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN) - MANT
    quantum = ((exp + 127) << 23).to(tl.float32, bitcast=True)  # 2**exp: one step of the grid
    magic = 12582912.0  # 1.5 * 2**23: adding then subtracting it rounds to an int, ties to even
    rounded = ((y / quantum + magic) - magic) * quantum
    return tl.where(rounded == 0.0, y * 0.0, rounded)  # keeps the sign of a zero


@triton.jit
def _to_cache(x, scale, FP8: tl.constexpr):
    """x (float32) as the cache stores it: FP8 = (MAX, MANT, EMIN, SOFT_ROUND) quantizes
    `x / scale` clamped to +-MAX; None leaves x to the store's cast."""
    if FP8 is not None:
        x = x / scale
        x = tl.minimum(tl.maximum(x, -FP8[0]), FP8[0])
        if FP8[3]:
            x = _round_to_fp8_grid(x, FP8[1], FP8[2])
    return x


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_src_h,
    stride_dst_h,
    cos,
    sin,
    num_heads,
    scale,
    BLOCK: tl.constexpr,
    HALF: tl.constexpr,
    FP8: tl.constexpr,
):
    """Rotate `num_heads` heads at src_ptr ([heads, 2*HALF], row stride stride_src_h) into
    dst_ptr (`_to_cache` with `scale` and FP8 first); num_heads = 0 writes nothing."""
    heads = tl.arange(0, BLOCK)
    offs = tl.arange(0, HALF)
    mask = (heads < num_heads)[:, None]
    src = src_ptr + heads[:, None] * stride_src_h + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype)
    if FP8 is not None:
        out1 = _to_cache(out1.to(tl.float32), scale, FP8)
        out2 = _to_cache(out2.to(tl.float32), scale, FP8)
    dst = dst_ptr + heads[:, None] * stride_dst_h + offs[None, :]
    elem = dst_ptr.dtype.element_ty
    tl.store(dst, out1.to(elem), mask=mask)
    tl.store(dst + HALF, out2.to(elem), mask=mask)


@triton.jit
def _rope_kv_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    positions_ptr,
    cos_sin_ptr,
    slot_mapping_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cs,
    stride_slot,
    stride_ch,
    k_scale,
    v_scale,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    HALF: tl.constexpr,
    FP8: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs)
    _rotate_heads(
        q_ptr + t * stride_qt,
        q_out_ptr + t * stride_qot,
        stride_qh,
        stride_qoh,
        cos,
        sin,
        NUM_HEADS,
        1.0,
        BLOCK_H,
        HALF,
        None,
    )
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    num_written = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # slot -1: a padded row, no write
    cache_off = tl.maximum(slot, 0) * stride_slot
    _rotate_heads(
        k_ptr + t * stride_kt,
        k_cache_ptr + cache_off,
        stride_kh,
        stride_ch,
        cos,
        sin,
        num_written,
        k_scale,
        BLOCK_KH,
        HALF,
        FP8,
    )
    heads = tl.arange(0, BLOCK_KH)
    offs_d = tl.arange(0, 2 * HALF)
    mask = (heads < num_written)[:, None]
    v = tl.load(
        v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs_d[None, :], mask=mask, other=0.0
    )
    if FP8 is not None:
        v = _to_cache(v.to(tl.float32), v_scale, FP8)
    v_dst = v_cache_ptr + cache_off + heads[:, None] * stride_ch + offs_d[None, :]
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def _check_args(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        check_rows(name, tensor, 3)
    check_tensor("positions", positions, 1, (torch.int64, torch.int32))
    check_tensor("cos_sin_cache", cos_sin_cache, 2, (torch.float32,))
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,))
    check_tensor("k_cache", k_cache, 4, FLOAT_DTYPES + FP8_KV_DTYPES)
    check_tensor("v_cache", v_cache, 4, FLOAT_DTYPES + FP8_KV_DTYPES)
    check_same_device(
        query=query,
        key=key,
        value=value,
        positions=positions,
        cos_sin_cache=cos_sin_cache,
        slot_mapping=slot_mapping,
        k_cache=k_cache,
        v_cache=v_cache,
    )
    num_tokens, _, head_dim = query.shape
    check_head_dim(head_dim)
    if key.shape != value.shape or key.shape[0] != num_tokens or key.shape[2] != head_dim:
        raise ValueError(
            f"key/value: shapes {tuple(key.shape)}/{tuple(value.shape)} do not match query {tuple(query.shape)}"
        )
    if positions.shape[0] != num_tokens or slot_mapping.shape[0] != num_tokens:
        raise ValueError(
            f"positions/slot_mapping: need {num_tokens} rows, got {positions.shape[0]}/{slot_mapping.shape[0]}"
        )
    if cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache: width {cos_sin_cache.shape[1]} != head_dim {head_dim} (partial rotary unsupported)"
        )
    if k_cache.shape != v_cache.shape or k_cache.shape[2:] != key.shape[1:]:
        raise ValueError(
            f"k_cache/v_cache: shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit key {tuple(key.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"v_cache: dtype {v_cache.dtype} differs from k_cache {k_cache.dtype}")


def _check_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    if not all(math.isfinite(s) and s > 0 for s in (k_scale, v_scale)):
        raise ValueError(f"k_scale/v_scale: must be finite and > 0, got {k_scale}/{v_scale}")
    if k_cache.dtype not in FP8_KV_DTYPES and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(
            f"k_scale/v_scale: a {k_cache.dtype} cache is unscaled, got {k_scale}/{v_scale}"
        )


def fp8_format(dtype: torch.dtype) -> tuple[float, int, int, bool] | None:
    """The kernel's FP8 constexpr for a cache of `dtype`: (largest finite value, mantissa bits,
    smallest normal exponent, round in software: the interpreter); None when unscaled."""
    if dtype not in FP8_KV_DTYPES:
        return None
    info = torch.finfo(dtype)
    mant = 3 if dtype == torch.float8_e4m3fn else 2
    return (float(info.max), mant, int(math.log2(info.smallest_normal)), interpreter_enabled())


def rope_kv_store(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Rotate q and k, store rotated k and v at their slots; return the rotated q (new tensor).

    query [T, H, D], key/value [T, Hkv, D] (last dim contiguous; strided views are fine);
    positions [T] int64; cos_sin_cache [max_pos, D] float32 (cos | sin halves); slot_mapping [T]
    int64 (slot = block * block_size + offset, -1 = skip); k_cache/v_cache
    [num_blocks, block_size, Hkv, D] contiguous, of a float dtype or FP8 (then k/v are stored
    divided by k_scale / v_scale, which must be 1.0 for other dtypes).
    """
    _check_args(query, key, value, positions, cos_sin_cache, slot_mapping, k_cache, v_cache)
    _check_scales(k_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return q_out
    _rope_kv_store_kernel[(num_tokens,)](
        query,
        key,
        value,
        positions,
        cos_sin_cache,
        slot_mapping,
        q_out,
        k_cache,
        v_cache,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        float(k_scale),
        float(v_scale),
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=next_power_of_2(num_heads),
        BLOCK_KH=next_power_of_2(num_kv_heads),
        HALF=head_dim // 2,
        FP8=fp8_format(k_cache.dtype),
        num_warps=4,
    )
    return q_out


def rope_kv_store_ref(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`apply_rope_ref` + `store_kv_ref`, skipping rows whose slot is -1."""
    positions = positions.long()
    q_out = apply_rope_ref(query, positions, cos_sin_cache)
    rotated = apply_rope_ref(key, positions, cos_sin_cache)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    store_kv_ref(rotated[keep], value[keep], k_cache, v_cache, slots, k_scale, v_scale)
    return q_out
