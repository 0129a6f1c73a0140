"""The decode GEMV of the weight-only linear (M <= GEMV_MAX_M rows): y = x @ w^T with 4-bit
(or 8-bit) weights, reading the packed weights along K, the axis they are contiguous in.

Same layout and arithmetic contract as `engine.kernels.w4a16` (see its docstring):
    4-bit: qweight int32 [N, K // 8], nibble i of word j is q[n, 8j + i];
           w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]
    8-bit: qweight int8 [N, K], w[n, k] = q[n, k] * scales[n, k // G] (no mins)

Design. A program owns BLOCK_N output features n of one row of x and walks its share of K in
chunks of BLOCK_KW packed words (BLOCK_KW * 8 columns k). Per chunk it loads the weights as a
[BLOCK_N, NG, G // 8] int32 tile, NG = BLOCK_KW * 8 // G groups: row n's words of the chunk are
consecutive in memory, so the innermost axis of the load is K and each thread reads 16 bytes
(4 words) at a time, neighbouring threads the neighbouring 16 bytes (coalesced). `tl.interleave`
(a register-only join, no shared memory) repeats each word 8 times along the last axis, giving
[BLOCK_N, NG, G] whose element p is word p // 8 shifted right by 4 * (p % 8): q[n, k0 + g G + p].
The nibble becomes a float without an int-to-float conversion: (nibble | 0x4B000000) is the
float 2^23 + q, exactly, and one subtraction leaves q.

The group's scale and min are applied once per group, not per element:
    sum_k w[n, k] x[k] = sum_g scales[n, g] * (sum_{k in g} q[n, k] x[k]) + mins[n, g] * sum_{k in g} x[k]
so the inner loop is (shift, mask, subtract, fused multiply-add) per nibble, everything in
float32; the per-group sums of q x and of x (the latter shared by all BLOCK_N rows) are reduced
within the group, and the [BLOCK_N, NG] float32 accumulator is reduced over groups at the end.
This differs from `w4a16_linear_ref` (which rounds w = q s + m first) only in float32 rounding.

Split-K: with `split_k` > 1 the K range is cut into `split_k` equal parts, one program each;
partials go to a float32 buffer [split_k, M, N], summed by torch in a fixed order
(deterministic, unlike atomics). The grid is (M, N blocks, split_k): the M <= GEMV_MAX_M
programs that share an N block are launched next to each other, so rows 2..M read the weights
from L2, not HBM.

Speed: UNMEASURED. Written without a GPU; the design follows from the access pattern only.
`bench/w4a16.py --sweep` times `GEMV_SWEEP` on the GPU host; `choose_gemv_config`'s defaults
should be set from that run.

Hazards: x's row offsets are int64; weight offsets are int64 (N * K // 8 words passes 2^31 for
large vocab projections). K must be a multiple of BLOCK_KW * 8 * split_k: `choose_gemv_config`
halves BLOCK_KW until it divides (K a multiple of 128 always works); a config given by hand is
checked by `check_gemv_config`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import num_sms

GEMV_MAX_M = 4  # rows up to this many take the GEMV (one program per row and N block)
MIN_WORDS_PER_SPLIT = 128  # a split shorter than 1024 columns costs more in partials than it saves
# The bits of the float 2^23: OR-ing an integer q < 2^23 into them gives the float 2^23 + q.
FLOAT_ONE_P23 = tl.constexpr(0x4B000000)


class GemvConfig(NamedTuple):
    """Launch parameters of the GEMV (powers of two). One program covers `block_n` output
    features and `block_kw` packed words (block_kw * 8 columns of K) per loop step."""

    block_n: int = 8
    block_kw: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Plausible configs for the GPU sweep: bytes per program per step (block_n * block_kw * 4)
# from 2 KB to 32 KB, each with enough threads to give every thread >= one 16-byte load.
GEMV_SWEEP: list[GemvConfig] = [
    GemvConfig(bn, kw, split, warps, stages)
    for bn, kw in (
        (1, 256),
        (2, 128),
        (2, 256),
        (4, 64),
        (4, 128),
        (4, 256),
        (8, 64),
        (8, 128),
        (8, 256),
        (16, 32),
        (16, 64),
        (16, 128),
    )  # fmt: skip
    for warps in (2, 4, 8)
    if bn * kw // 4 >= 32 * warps  # every thread holds at least one 4-word vector
    for stages, split in ((2, 1), (3, 1), (2, 2))
]


@triton.jit
def _chunk_dot(
    qw_ptr,
    s_ptr,
    m_ptr,
    offs_n,
    mask_n,
    x_row,
    k0,
    K,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """[BLOCK_N, BLOCK_KW] float32: for each row n and packed word j of the chunk starting at
    column k0, scales * sum(q x) + mins * sum(x) over the word's 8 columns."""
    row_n = offs_n.to(tl.int64)[:, None]
    mask = mask_n[:, None]
    w = k0 // 8 + tl.arange(0, BLOCK_KW)[None, :]  # packed word index, [1, BLOCK_KW]
    qx = tl.zeros((offs_n.shape[0], BLOCK_KW), dtype=tl.float32)
    xs = tl.zeros((1, BLOCK_KW), dtype=tl.float32)
    if BITS == 4:
        words = tl.load(qw_ptr + row_n * (K // 8) + w, mask=mask, other=0)
        for i in tl.static_range(8):
            x = tl.load(x_row + w * 8 + i).to(tl.float32)
            bits = ((words >> (4 * i)) & 0xF) | FLOAT_ONE_P23
            qx += (bits.to(tl.float32, bitcast=True) - 8388608.0) * x  # 2^23 + q - 2^23: exact
            xs += x
    else:
        for i in tl.static_range(8):
            x = tl.load(x_row + w * 8 + i).to(tl.float32)
            q = tl.load(qw_ptr + row_n * K + w * 8 + i, mask=mask, other=0)
            qx += q.to(tl.float32) * x
    group = w // (GROUP // 8)
    scale = tl.load(s_ptr + row_n * (K // GROUP) + group, mask=mask, other=0.0).to(tl.float32)
    out = qx * scale
    if HAS_MINS:
        mins = tl.load(m_ptr + row_n * (K // GROUP) + group, mask=mask, other=0.0)
        out += mins.to(tl.float32) * xs
    return out


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    m_ptr,
    out_ptr,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_om,
    stride_os,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """Grid (M, N blocks, splits). Writes out[row, n block] (x's dtype) or, with several splits,
    this split's float32 partial (out_ptr + split * stride_os)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_KW * 8):
        acc += _chunk_dot(
            qw_ptr, s_ptr, m_ptr, offs_n, mask_n, x_row, k0, K,
            BITS, HAS_MINS, GROUP, BLOCK_KW,
        )  # fmt: skip
    y = tl.sum(acc, axis=1)
    out = out_ptr + pid_k.to(tl.int64) * stride_os + pid_m.to(tl.int64) * stride_om
    tl.store(out + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def check_gemv_config(config: GemvConfig, k: int, group_size: int) -> None:
    """A config the GEMV can run: powers of two, a step of whole groups, splits of whole steps.
    Raises ValueError naming the field."""
    for name in GemvConfig._fields:
        value = getattr(config, name)
        if value < 1 or (name != "num_stages" and value & (value - 1)):
            raise ValueError(f"config.{name}: must be a power of two >= 1, got {value}")
    if config.block_kw * 8 < group_size:
        raise ValueError(f"config.block_kw: {config.block_kw} words < one group of {group_size}")
    if k % (config.split_k * config.block_kw * 8):
        raise ValueError(
            f"config.split_k: {config.split_k} x block_kw {config.block_kw} x 8 must divide K {k}"
        )


def choose_gemv_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> GemvConfig:
    """The default GEMV config for an [m, k] x [n, k]^T product; depends on the shape and device
    only (CUDA-graph safe). The step shrinks (down to one group) until it divides K; K is split
    only while the grid has fewer programs than twice the SMs. Unmeasured defaults: set them
    from `bench/w4a16.py --sweep`."""
    base = GemvConfig()
    block_kw = base.block_kw
    while block_kw * 8 > group_size and k % (block_kw * 8):
        block_kw //= 2
    programs = m * -(-n // base.block_n)
    split = 1
    while (
        programs * split < 2 * num_sms(device)
        and k % (2 * split * block_kw * 8) == 0
        and k // 8 // (2 * split) >= MIN_WORDS_PER_SPLIT
    ):
        split *= 2
    return base._replace(block_kw=block_kw, split_k=split)


def launch_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    group_size: int,
    bits: int,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """y [M, N] in x's dtype, on arguments already checked by `check_quantized_args` (4-bit with
    mins, or 8-bit without). Any M runs (one program per row); the dispatch sends it
    M <= GEMV_MAX_M only."""
    m, k = x.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    config = config or choose_gemv_config(m, n, k, group_size, x.device)
    check_gemv_config(config, k, group_size)
    target = out
    if config.split_k > 1:
        target = torch.empty((config.split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (m, triton.cdiv(n, config.block_n), config.split_k)
    _gemv_kernel[grid](
        x,
        qweight,
        scales,
        scales if mins is None else mins,
        target,
        n,
        k,
        k // config.split_k,
        x.stride(0),
        target.stride(-2),
        target.stride(0) if config.split_k > 1 else 0,
        BITS=bits,
        HAS_MINS=mins is not None,
        GROUP=group_size,
        BLOCK_N=config.block_n,
        BLOCK_KW=config.block_kw,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.split_k > 1:
        out.copy_(target.sum(0))  # a fixed order: deterministic, unlike atomics
    return out
