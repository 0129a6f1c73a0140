"""One kernel for a row-parallel layer's all-reduce, the residual add and RMSNorm, over buffers
every rank has mapped (symmetric memory; set-up, protocol and hazards: engine.distributed.fused_norm).

    new_residual = round(sum over ranks of x_r, in rank order, in float32) + residual
    normed = rmsnorm(new_residual) * weight            (engine.kernels.fused_add_rmsnorm's rounding)

One program per row; every program of a call must be resident at once (the caller bounds rows).
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import next_power_of_2
from engine.kernels.fused_add_rmsnorm import _rmsnorm_row

MAX_WORLD = 4  # the kernel's arguments carry up to four ranks' buffers
MAX_SPINS = 1 << 26  # a peer that never arrives: give up after roughly seconds


@triton.jit
def _pick(i: tl.constexpr, p0, p1, p2, p3):
    if i == 0:
        return p0
    elif i == 1:
        return p1
    elif i == 2:
        return p2
    else:
        return p3


@triton.jit
def _ar_add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    b0,
    b1,
    b2,
    b3,
    f0,
    f1,
    f2,
    f3,
    failed_ptr,
    hidden,
    eps,
    max_spins,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * hidden + offs, mask=mask, other=0.0)
    tl.store(_pick(RANK, b0, b1, b2, b3) + row * hidden + offs, x, mask=mask)
    tl.debug_barrier()  # the whole row is written before any peer is told
    for r in tl.static_range(WORLD):
        if r != RANK:
            tl.atomic_xchg(
                _pick(r, f0, f1, f2, f3) + row * WORLD + RANK, 1, sem="release", scope="sys"
            )
    mine = _pick(RANK, f0, f1, f2, f3) + row * WORLD
    for r in tl.static_range(WORLD):
        if r != RANK:
            got = tl.atomic_cas(mine + r, 1, 0, sem="acquire", scope="sys")
            spins = 0
            while (got != 1) & (spins < max_spins):
                got = tl.atomic_cas(mine + r, 1, 0, sem="acquire", scope="sys")
                spins += 1
            if got != 1:
                tl.atomic_xchg(failed_ptr, 1)
    tl.debug_barrier()  # every thread reads the peers' rows only after the flags arrived
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            peer = tl.load(
                _pick(r, b0, b1, b2, b3) + row * hidden + offs, mask=mask, other=0.0, volatile=True
            )
            acc += peer.to(tl.float32)
    res = tl.load(res_ptr + row * hidden + offs, mask=mask, other=0.0)
    h = (acc.to(res.dtype).to(tl.float32) + res.to(tl.float32)).to(res.dtype)
    tl.store(res_out_ptr + row * hidden + offs, h, mask=mask)
    _rmsnorm_row(h, w_ptr, out_ptr + row * hidden, offs, mask, hidden, eps)


def allreduce_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    data: list[torch.Tensor],
    flags: list[torch.Tensor],
    failed: torch.Tensor,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, new_residual) of [T, hidden]. `data[r]` / `flags[r]`: rank r's slot of this call
    (>= T * hidden elements of x's dtype / >= T * world int32, zero between calls), as mapped in
    this process; `failed` (int32 [1]) is set when a peer never arrived."""
    world = len(data)
    assert (
        1 < world <= MAX_WORLD
        and len(flags) == world
        and x.shape == residual.shape
        and x.dim() == 2
    )
    residual = residual.contiguous()
    out = torch.empty_like(residual)
    new_residual = torch.empty_like(residual)
    if x.shape[0] == 0:
        return out, new_residual
    pad = data + [data[rank]] * (MAX_WORLD - world)
    pad_flags = flags + [flags[rank]] * (MAX_WORLD - world)
    block = next_power_of_2(x.shape[1])
    _ar_add_rmsnorm_kernel[(x.shape[0],)](
        x.contiguous(),
        residual,
        weight,
        out,
        new_residual,
        *pad,
        *pad_flags,
        failed,
        x.shape[1],
        eps,
        MAX_SPINS,
        RANK=rank,
        WORLD=world,
        BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )
    return out, new_residual
