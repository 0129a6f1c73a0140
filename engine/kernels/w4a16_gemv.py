"""The decode GEMV of the weight-only linear (M <= GEMV_MAX_M rows): y = x @ w^T with 4-bit
(or 8-bit) weights, reading the packed weights along K, the axis they are contiguous in.

Same layout and arithmetic contract as `engine.kernels.w4a16` (see its docstring):
    4-bit: qweight int32 [N, K // 8], nibble i of word j is q[n, 8j + i];
           w[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]
    8-bit: qweight int8 [N, K], w[n, k] = q[n, k] * scales[n, k // G] (no mins)

Design. A program owns BLOCK_N output features n of one row of x and walks its share of K in
steps of BLOCK_KW 4-bit words (BLOCK_KW * 8 columns k; the 8-bit path takes the same columns,
twice the bytes). Per step it loads the weights as an int32 tile [BLOCK_N, NG, G // 8],
NG = BLOCK_KW * 8 // G groups (8-bit: [BLOCK_N, NG, G // 4], an int8 row viewed as int32
words): row n's words of the step are consecutive in memory, so the innermost axis of the load
is K; each thread reads 16 bytes (4 words), neighbouring threads the neighbouring 16 bytes
(coalesced). `tl.interleave` (a join along a new in-thread axis, no shared memory) repeats
each word 8 (8-bit: 4) times along the last axis, giving [BLOCK_N, NG, G] whose element p is
the nibble (byte) p % 8 (p % 4) of its word: q[n, k0 + g G + p]. The nibble becomes a float
without an int-to-float conversion: (nibble | 0x4B000000) is the float 2^23 + q exactly, and
one subtraction leaves q (the int8 byte XOR 0x80 is q + 128, likewise). The next step's words
are loaded before this step's arithmetic (a hand-written 2-stage pipeline: Triton's pipeliner
stages only loops with dots, and num_stages 1..3 compile to the same PTX here).

The group's scale and min are applied once per group, not per element:
    sum_k w[n, k] x[k] = sum_g scales[n, g] sum_{k in g} q[n, k] x[k] + mins[n, g] sum_{k in g} x[k]
so the inner loop is (shift, mask/or, subtract, multiply-add) per nibble, all in float32; the
per-group sums of q x and of x (the latter shared by all BLOCK_N rows) are reduced within the
group, and the [BLOCK_N, NG] float32 accumulator is reduced over groups at the end. This
differs from `w4a16_linear_ref` (which rounds w = q s + m first) only in float32 rounding.

Split-K: with `split_k` > 1 the K range is cut into `split_k` parts of whole steps (the last
one shorter, or empty, where the steps do not divide evenly), one program each; partials go to
a float32 buffer [split_k, M, N], summed by torch in a fixed order (deterministic, unlike
atomics; one more small launch). The grid is (M, N blocks, split_k): the M <= GEMV_MAX_M
programs that share an N block are launched next to each other, so rows 2..M mostly read the
weights from L2, not HBM.

Speed: UNMEASURED. Written without a GPU; the design follows from the access pattern and from
the TTGIR/PTX of an sm_90 compile done on a CPU host (Triton 3.9): 16-byte `ld.global.v4.b32`
weight loads, no local-memory spills, the unpacking in registers. Known cost: x's step is
loaded in its own coalesced layout (16 bytes a thread) and moved into the tile's (32 columns
a thread) through shared memory once per step (BLOCK_KW * 8 floats and a few barriers per
program and step, independent of BLOCK_N: larger BLOCK_N amortises it). `bench/w4a16.py
--sweep` times `GEMV_SWEEP` on the GPU host; `GemvConfig`'s defaults and
`choose_gemv_config` should be set from that run.

Hazards: x's row offsets are int64; weight offsets are int64 (N * K // 8 words passes 2^31 for
large vocab projections). K must be a multiple of BLOCK_KW * 8: `choose_gemv_config` halves
BLOCK_KW until it divides (down to one group, which always does); a config given by hand is
checked by `check_gemv_config`. The words' row stride is passed separately from K and the loop
runs over words, so Triton's divisibility specialisation proves 16-byte alignment (a loop over
columns k, divided by 8, proved only 8 bytes: the compile then emitted 8-byte loads).
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
    num_stages: int = 1


# Plausible configs for the GPU sweep: bytes per program per step (block_n * block_kw * 4)
# from 1 KB to 8 KB, every thread holding one or two 16-byte vectors of words (an sm_90 compile
# of 8 words a thread takes 96-117 registers, no spills; 32 words a thread spilled), split-K
# 1, 2 and 4. num_stages stays 1: Triton 3.9 compiles the same PTX for num_stages 1..3 (the
# loop has no `tl.dot`), so staging is not a dimension to sweep.
GEMV_SWEEP: list[GemvConfig] = [
    GemvConfig(bn, kw, split, warps, 1)
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
    if 4 * 32 * warps <= bn * kw <= 8 * 32 * warps  # 4 or 8 words a thread
    for split in (1, 2, 4)
]


@triton.jit
def _load_step(
    qw_ptr,
    offs_n,
    mask_n,
    kw0,
    stride_qw,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
):
    """The int32 words of rows offs_n for the step starting at (4-bit) word kw0, masked rows
    0: [BLOCK_N, NG, GROUP * BITS // 32], contiguous along the last axis (an 8-bit row is read
    as int32 words of 4 bytes, so both widths share the unpacking below)."""
    row_n = offs_n.to(tl.int64)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    j = tl.arange(0, GROUP * BITS // 32)[None, None, :]
    ptrs = qw_ptr + row_n * stride_qw + (kw0 * BITS // 4 + g * (GROUP * BITS // 32) + j)
    return tl.load(ptrs, mask=mask_n[:, None, None], other=0)


@triton.jit
def _step_dot(
    packed,
    s_ptr,
    m_ptr,
    offs_n,
    mask_n,
    x_row,
    kw0,
    stride_s,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    GROUP: tl.constexpr,
    NG: tl.constexpr,
):
    """[BLOCK_N, NG] float32: for each row n and group g of the step starting at word kw0,
    scales * sum(q x) + mins * sum(x) over the group's columns; `packed` from `_load_step`."""
    g = tl.arange(0, NG)[None, :, None]
    p = tl.arange(0, GROUP)[None, None, :]
    x = tl.load(x_row + kw0 * 8 + g * GROUP + p).to(tl.float32)  # [1, NG, GROUP]
    words = tl.interleave(packed, packed)
    words = tl.interleave(words, words)
    if BITS == 4:
        words = tl.interleave(words, words)  # [BLOCK_N, NG, GROUP], element p = word p // 8
        bits = ((words >> ((p % 8) * 4)) & 0xF) | FLOAT_ONE_P23
        q = bits.to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + q - 2^23: exact
    else:  # element p = byte p % 4 of word p // 4, int8 q; q + 128 is its bits XOR 0x80
        bits = (((words >> ((p % 4) * 8)) & 0xFF) ^ 0x80) | FLOAT_ONE_P23
        q = bits.to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + (q + 128) - 2^23 - 128
    qx = tl.sum(q * x, axis=2)  # [BLOCK_N, NG]
    group = kw0 // (GROUP // 8) + tl.arange(0, NG)[None, :]
    row_g = offs_n.to(tl.int64)[:, None] * stride_s
    mask_g = mask_n[:, None]
    scale = tl.load(s_ptr + row_g + group, mask=mask_g, other=0.0).to(tl.float32)
    out = qx * scale
    if HAS_MINS:
        mins = tl.load(m_ptr + row_g + group, mask=mask_g, other=0.0).to(tl.float32)
        out += mins * tl.sum(x, axis=2)
    return out


@triton.jit
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    m_ptr,
    out_ptr,
    N,
    KW,
    kw_per_split,
    stride_xm,
    stride_qw,
    stride_s,
    stride_om,
    stride_os,
    BITS: tl.constexpr,
    HAS_MINS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr,
):
    """Grid (M, N blocks, splits). Writes out[row, n block] (x's dtype) or, with several splits,
    this split's float32 partial (out_ptr + split * stride_os). Each step's weights are loaded
    one step ahead (a hand-written 2-stage pipeline: Triton's pipeliner does not stage this
    loop), so every warp keeps two steps of loads in flight."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NG: tl.constexpr = BLOCK_KW * 8 // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    kw_start = pid_k * kw_per_split  # in packed words (8 columns): keeps 16-byte alignment known
    kw_end = tl.minimum(kw_start + kw_per_split, KW)
    rows = tl.where(kw_start < kw_end, N, 0)  # an empty split (uneven steps) reads nothing
    packed = _load_step(qw_ptr, offs_n, offs_n < rows, kw_start, stride_qw, BITS, GROUP, NG)
    for kw0 in range(kw_start, kw_end, BLOCK_KW):
        kw_next = kw0 + BLOCK_KW
        rows_ahead = tl.where(kw_next < kw_end, N, 0)  # the last step prefetches nothing
        ahead = _load_step(qw_ptr, offs_n, offs_n < rows_ahead, kw_next, stride_qw, BITS, GROUP, NG)
        acc += _step_dot(
            packed, s_ptr, m_ptr, offs_n, mask_n, x_row, kw0, stride_s,
            BITS, HAS_MINS, GROUP, NG,
        )  # fmt: skip
        packed = ahead
    y = tl.sum(acc, axis=1)
    out = out_ptr + pid_k.to(tl.int64) * stride_os + pid_m.to(tl.int64) * stride_om
    tl.store(out + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def check_gemv_config(config: GemvConfig, k: int, group_size: int) -> None:
    """A config the GEMV can run: powers of two, a step of whole groups that divides K (splits
    take whole steps, the last split fewer). Raises ValueError naming the field."""
    for name in GemvConfig._fields:
        value = getattr(config, name)
        if value < 1 or (name != "num_stages" and value & (value - 1)):
            raise ValueError(f"config.{name}: must be a power of two >= 1, got {value}")
    if config.block_kw * 8 < group_size:
        raise ValueError(f"config.block_kw: {config.block_kw} words < one group of {group_size}")
    if k % (config.block_kw * 8):
        raise ValueError(f"config.block_kw: {config.block_kw} x 8 columns must divide K {k}")


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
        and k % (2 * split * block_kw * 8) == 0  # equal splits when the heuristic chooses
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
    if bits == 8:  # int8 rows as int32 words (K is a multiple of the group, hence of 4)
        qweight = qweight.view(torch.int32)
    _gemv_kernel[grid](
        x,
        qweight,
        scales,
        scales if mins is None else mins,
        target,
        n,
        k // 8,
        triton.cdiv(k // 8 // config.block_kw, config.split_k) * config.block_kw,
        x.stride(0),
        qweight.stride(0),
        scales.stride(0),
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
