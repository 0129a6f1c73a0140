"""SiLU-and-multiply, the gated MLP activation: x [N, 2*I] = gate | up -> silu(gate) * up [N, I].

Grid (rows, column blocks); computed in float32 and rounded once to the input dtype (the torch
reference rounds silu(gate) first, so results may differ by one rounding step). Rows are
addressed with int64 offsets (N * 2I can pass 2^31 in long prefills).
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import check_rows
from engine.layers.activation import (  # re-exported: the one torch reference, Triton-free
    silu_and_mul_ref as silu_and_mul_ref,
)

BLOCK_COLS = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :I]) * x[:, I:] for x [N, 2*I] (last dim contiguous); returns [N, I]."""
    check_rows("x", x, 2)
    if x.shape[1] % 2:
        raise ValueError(f"x: last dim must be even (gate | up), got {x.shape[1]}")
    num_rows, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows == 0 or inter == 0:
        return out
    grid = (num_rows, triton.cdiv(inter, BLOCK_COLS))
    _silu_and_mul_kernel[grid](
        x, out, x.stride(0), out.stride(0), inter, BLOCK=BLOCK_COLS, num_warps=4
    )
    return out
