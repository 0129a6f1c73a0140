"""Weight-only quantized linear, y = x @ w^T with 4-bit (or 8-bit) weights dequantized in registers.

The layout (shared with `engine.quant`, the GGUF repacking and every 4-bit method):
    qweight int32 [N, K // 8]: nibble i (bits 4i..4i+3, unsigned 0..15) of word j is q[n, 8j + i]
    scales, mins  [N, K // G]: w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]
The 8-bit variant (`engine.kernels.w8a16`) reads qweight int8 [N, K] and no mins. Scales may be
in any float dtype (the activation dtype, or float16/float32 where that keeps them exact, as
GGUF's float16 block scales are): they are widened to float32 in registers.

The dedicated GEMV in `engine.kernels.w4a16_gemv` reads the packed words along K (coalesced
16-byte loads; its docstring has the design). It has never run on a GPU: until the GPU sweep of
`bench/w4a16.py --sweep` measures it, the default stays this module's kernel, the one measured
(`GEMV_BY_DEFAULT`; then M <= GEMV_MAX_M = 4 would go to the GEMV). Passing a `GemvConfig` forces
the GEMV for any M; passing a `W4A16Config` forces this module's kernel.

This module's kernel has two paths picked by `choose_config` from the number of rows M:
- decode (M <= 16; M <= 4 only when forced): GEMV-like. Each program streams a
  [BLOCK_K, BLOCK_N] slab of the packed weights per step for one block of output features;
  split-K over `split_k` programs fills the GPU when N alone gives too few blocks (partial
  sums go to a float32 buffer [split_k, M, N], summed by torch in a fixed order:
  deterministic). M = 1 multiplies and accumulates in float32
  without `tl.dot`; M in 2..16 pads to a 16-row `tl.dot`.
- GEMM (M > 16, prefill): tiles of [BLOCK_M, BLOCK_N] with `tl.dot`, the dequantized weight tile
  rounded to x's dtype (as the tensor cores take it), accumulated in float32.
Weights are dequantized in float32 (q * scale + min), as the torch reference does: in float32
and on M = 1 the kernel equals the reference to float32 summation order.

Hazards: row offsets are int64 (x and y of a long prefill pass 2^31 elements). The grid depends on
(M, N, K) only, so a CUDA graph captured for one batch size replays with the same split.
K must be a multiple of the group size (32, 64 or 128), which every packed checkpoint has.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import (
    FLOAT_DTYPES,
    check_rows,
    check_same_device,
    check_tensor,
    dot_precision,
    num_sms,
    upcast_dot,
)
from engine.kernels.w4a16_gemv import GEMV_MAX_M, GemvConfig, launch_gemv

# The GEMV takes small M by default only once a GPU run has measured it (see the docstring).
GEMV_BY_DEFAULT = False

GROUP_SIZES = (32, 64, 128)
DECODE_MAX_M = 16  # up to this many rows take the decode (split-K) path
MIN_K_PER_SPLIT = 512  # a split shorter than this costs more in partial sums than it saves


class W4A16Config(NamedTuple):
    """Tile sizes and launch parameters (powers of two; `block_k` divides K // split_k)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _dequant_tile(
    qw_ptr,
    s_ptr,
    m_ptr,
    offs_n,
    mask_n,
    k0,
    K,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Weights w[offs_n, k0 : k0 + BLOCK_K] in float32 as [BLOCK_K // SUB, SUB // 8, 8, BLOCK_N]:
    axis 0 one group (or a piece of one, SUB = min(BLOCK_K, GROUP)), axes 1-2 the column k
    within it as 8 * word + nibble. Built from 4-D pointers, so no register reshape is needed."""
    g = tl.arange(0, BLOCK_K // SUB)[:, None, None, None]
    j = tl.arange(0, SUB // 8)[None, :, None, None]
    i = tl.arange(0, 8)[None, None, :, None]
    n = offs_n.to(tl.int64)[None, None, None, :]
    nmask = mask_n[None, None, None, :]
    if BITS == 4:
        words = tl.load(qw_ptr + n * (K // 8) + (k0 // 8 + g * (SUB // 8) + j), mask=nmask, other=0)
        q = (words >> (i * 4)) & 0xF
    else:
        q = tl.load(qw_ptr + n * K + (k0 + g * SUB + j * 8 + i), mask=nmask, other=0)
    group = (k0 + g * SUB) // GROUP
    scale = tl.load(s_ptr + n * (K // GROUP) + group, mask=nmask, other=0.0).to(tl.float32)
    w = q.to(tl.float32) * scale
    if HAS_MINS:
        w += tl.load(m_ptr + n * (K // GROUP) + group, mask=nmask, other=0.0).to(tl.float32)
    return w


@triton.jit
def _wxa16_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    m_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_om,
    stride_os,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    GROUP: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (M blocks, N blocks, splits). Writes rows x cols of out (x's dtype) or, with
    several splits, of this split's float32 partial (out_ptr + split * stride_os)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    rows = offs_m.to(tl.int64) * stride_xm
    k_start = pid_k * k_per_split
    if BLOCK_M == 1:  # GEMV: multiply-accumulate in the tile's own shape, reduce once at the end
        acc4 = tl.zeros((BLOCK_K // SUB, SUB // 8, 8, BLOCK_N), dtype=tl.float32)
        g = tl.arange(0, BLOCK_K // SUB)[:, None, None, None] * SUB
        kk = (
            g
            + tl.arange(0, SUB // 8)[None, :, None, None] * 8
            + tl.arange(0, 8)[None, None, :, None]
        )
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            w = _dequant_tile(
                qw_ptr, s_ptr, m_ptr, offs_n, mask_n, k0, K, BITS, HAS_MINS, GROUP, SUB, BLOCK_K
            )
            x = tl.load(x_ptr + pid_m.to(tl.int64) * stride_xm + k0 + kk).to(tl.float32)
            acc4 += w * x
        acc = tl.sum(tl.reshape(acc4, (BLOCK_K, BLOCK_N)), axis=0)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            x = tl.load(x_ptr + rows[:, None] + (k0 + offs_k)[None, :], mask=mask_m[:, None])
            w4 = _dequant_tile(
                qw_ptr, s_ptr, m_ptr, offs_n, mask_n, k0, K, BITS, HAS_MINS, GROUP, SUB, BLOCK_K
            )
            w = tl.reshape(w4, (BLOCK_K, BLOCK_N))
            if UPCAST_DOT:
                x, w = x.to(tl.float32), w.to(x.dtype).to(tl.float32)
            else:
                w = w.to(x.dtype)
            acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    out = out_ptr + pid_k.to(tl.int64) * stride_os
    mask = mask_m[:, None] & mask_n[None, :]
    ptrs = out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_k(k: int, preferred: int) -> int:
    """The largest power of two <= `preferred` (and >= 32) that divides `k`."""
    block = preferred
    while block > 32 and k % block:
        block //= 2
    return block


def choose_config(m: int, n: int, k: int, device: torch.device) -> W4A16Config:
    """The decode (split-K) or GEMM tiles for an [m, k] x [n, k]^T product. Depends on the
    shape and the device only (CUDA-graph safe)."""
    if m > DECODE_MAX_M:
        block_m = 64 if m <= 64 else 128
        return W4A16Config(block_m, 128, _block_k(k, 64), 1, 8 if block_m == 128 else 4, 3)
    block_m, block_n, preferred_k = (1, 32, 256) if m == 1 else (16, 64, 128)
    block_k = _block_k(k, preferred_k)
    num_blocks = -(-n // block_n)
    split = 1
    target = 2 * num_sms(device)
    while (
        num_blocks * split < target
        and k % (2 * split * block_k) == 0
        and k // (2 * split) >= MIN_K_PER_SPLIT
    ):
        split *= 2
    return W4A16Config(block_m, block_n, block_k, split, 4, 4)


def check_config(config: W4A16Config, k: int, group_size: int) -> None:
    """A config the kernel can run: tiles are powers of two and splits cover K in whole tiles."""
    for name in ("block_m", "block_n", "block_k", "split_k"):
        value = getattr(config, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"config.{name}: must be a power of two, got {value}")
    if (config.block_m != 1 and config.block_m < 16) or config.block_n < 16:
        raise ValueError(f"config: block_m must be 1 or >= 16, block_n >= 16: {config}")
    if config.block_k < 32 or k % (config.split_k * config.block_k):
        raise ValueError(
            f"config: block_k {config.block_k} (>= 32) x split_k {config.split_k} must divide K {k}"
        )
    del group_size  # any power-of-two block_k >= 32 meets a power-of-two group of 32..128


def check_quantized_args(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    group_size: int,
    bits: int,
) -> None:
    """Shapes, dtypes, devices and contiguity of a weight-only linear's arguments; ValueError
    naming the argument."""
    check_rows("x", x, 2)
    k = x.shape[1]
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size: must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"x: K {k} is not a multiple of group_size {group_size}")
    packed = k // 8 if bits == 4 else k
    check_tensor("qweight", qweight, 2, (torch.int32,) if bits == 4 else (torch.int8,))
    if qweight.shape[1] != packed:
        raise ValueError(f"qweight: {qweight.shape[1]} columns, K {k} needs {packed}")
    want = (qweight.shape[0], k // group_size)
    check_tensor("scales", scales, 2, FLOAT_DTYPES)
    if tuple(scales.shape) != want:
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected {want}")
    if mins is not None:
        check_tensor("mins", mins, 2, FLOAT_DTYPES)
        if mins.shape != scales.shape:
            raise ValueError(f"mins: shape {tuple(mins.shape)} != scales {tuple(scales.shape)}")
    tensors = {"x": x, "qweight": qweight, "scales": scales}
    check_same_device(**tensors, **({} if mins is None else {"mins": mins}))


def launch_weight_only(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    group_size: int,
    bits: int,
    config: W4A16Config | GemvConfig | None,
) -> torch.Tensor:
    """Run the kernel on checked arguments (w4a16_linear / w8a16_linear check them first): the
    GEMV for a `GemvConfig` or, without a config, for M <= GEMV_MAX_M; else the tiled kernel."""
    m, k = x.shape
    n = qweight.shape[0]
    if isinstance(config, GemvConfig) or (
        config is None and GEMV_BY_DEFAULT and 0 < m <= GEMV_MAX_M
    ):
        return launch_gemv(x, qweight, scales, mins, group_size, bits, config)
    config = config or choose_config(m, n, k, x.device)
    check_config(config, k, group_size)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    target = out
    if config.split_k > 1:
        target = torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), config.split_k)
    _wxa16_kernel[grid](
        x,
        qweight,
        scales,
        scales if mins is None else mins,
        target,
        m,
        n,
        k,
        k // config.split_k,
        x.stride(0),
        target.stride(-2),
        target.stride(0) if config.split_k > 1 else 0,
        BITS=bits,
        HAS_MINS=mins is not None,
        GROUP=group_size,
        SUB=min(config.block_k, group_size),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        UPCAST_DOT=upcast_dot(x.dtype),
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.split_k > 1:
        out.copy_(target.sum(0))  # a fixed order: deterministic, unlike atomics
    return out


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
    config: W4A16Config | GemvConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w^T in x's dtype, w dequantized from the 4-bit layout (module
    docstring). `config` overrides the kernel and its tiles (benchmarks). Raises ValueError
    naming a bad argument."""
    check_quantized_args(x, qweight, scales, mins, group_size, bits=4)
    return launch_weight_only(x, qweight, scales, mins, group_size, 4, config)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """q [N, K] int32 (0..15) from qweight int32 [N, K // 8]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device)
    return (qweight.unsqueeze(-1) >> shifts).bitwise_and_(0xF).view(qweight.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """qweight int32 [N, K // 8] from q [N, K] (integers 0..15, K a multiple of 8)."""
    assert q.dim() == 2 and q.shape[1] % 8 == 0, f"q: shape {tuple(q.shape)}"
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    words = (q.to(torch.int64).reshape(q.shape[0], -1, 8) << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def dequantize_int4(
    qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int
) -> torch.Tensor:
    """w [N, K] float32 = q * scale + min, in float32 (the kernel's arithmetic), computed per
    group by broadcasting (no [N, K] copy of the scales)."""
    n = qweight.shape[0]
    w = unpack_int4(qweight).view(n, -1, group_size).to(torch.float32)
    w.mul_(scales.to(torch.float32).unsqueeze(-1)).add_(mins.to(torch.float32).unsqueeze(-1))
    return w.view(n, -1)


def w4a16_linear_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """The exact math in torch (any device): the dequantized float32 weights, a float32
    product, rounded once to x's dtype. Materialises w [N, K] in float32 on every call."""
    w = dequantize_int4(qweight, scales, mins, group_size)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
