"""RMSNorm, alone and fused with the residual add (Llama / Hugging Face semantics).

    new_residual = x + residual                      (rounded to the residual's dtype; x may be a
                                                      float32 all-reduce result, rounded to that
                                                      dtype first, exactly as an activation is)
    normed = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype),  h = new_residual in float32

One program per row of [N, hidden]; the whole row sits in registers (hidden <= 65536). Rows are
addressed with int64 offsets. Outputs are new tensors; inputs are not mutated.
"""

from __future__ import annotations

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import check_rows, check_same_device, check_tensor, next_power_of_2
from engine.layers.norm import rmsnorm_ref  # the one torch reference: importable without Triton

MAX_HIDDEN = 65536


@triton.jit
def _rmsnorm_row(h, w_ptr, out_ptr, offs, mask, hidden, eps):
    """Normalize one row `h` (activation dtype) and store weight * normed."""
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / hidden + eps)
    normed = (hf * rstd).to(h.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(h.dtype), mask=mask)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, hidden, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    _rmsnorm_row(h, w_ptr, out_ptr + row * stride_out, offs, mask, hidden, eps)


@triton.jit
def _fused_add_rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    hidden,
    eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    res = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
    h = (x.to(res.dtype, fp_downcast_rounding="rtne").to(tl.float32) + res.to(tl.float32)).to(
        res.dtype
    )
    tl.store(res_out_ptr + row * stride_res_out + offs, h, mask=mask)
    _rmsnorm_row(h, w_ptr, out_ptr + row * stride_out, offs, mask, hidden, eps)


def _check_norm_args(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype | None = None
) -> None:
    """`dtype`: the activation dtype (x's unless given)."""
    check_rows("x", x, 2)
    check_tensor("weight", weight, 1)
    check_same_device(x=x, weight=weight)
    if weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight: length {weight.shape[0]} != hidden size {x.shape[1]}")
    dtype = x.dtype if dtype is None else dtype
    if weight.dtype != dtype:
        raise ValueError(f"weight: dtype {weight.dtype} != activation dtype {dtype}")
    if not 0 < x.shape[1] <= MAX_HIDDEN:
        raise ValueError(f"x: hidden size {x.shape[1]} outside (0, {MAX_HIDDEN}]")
    if eps <= 0:
        raise ValueError(f"eps: must be > 0, got {eps}")


def _launch_params(hidden: int) -> tuple[int, int]:
    block = next_power_of_2(hidden)
    return block, min(16, max(1, block // 512))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rmsnorm(x) over rows x [N, hidden] (last dim contiguous); returns [N, hidden]."""
    _check_norm_args(x, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0:
        return out
    block, num_warps = _launch_params(x.shape[1])
    _rmsnorm_kernel[(x.shape[0],)](
        x,
        weight,
        out,
        x.stride(0),
        out.stride(0),
        x.shape[1],
        eps,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual) with new_residual = x + residual, both [N, hidden] in the
    residual's dtype. x has that dtype, or float32 (a row-parallel layer's float32 sum)."""
    _check_norm_args(x, weight, eps, residual.dtype)
    check_rows("residual", residual, 2)
    if residual.shape != x.shape or x.dtype not in (residual.dtype, torch.float32):
        raise ValueError(
            f"residual: {tuple(residual.shape)}/{residual.dtype} does not match x "
            f"{tuple(x.shape)}/{x.dtype}"
        )
    check_same_device(x=x, residual=residual)
    out = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    new_residual = torch.empty(x.shape, dtype=residual.dtype, device=x.device)
    if x.shape[0] == 0:
        return out, new_residual
    block, num_warps = _launch_params(x.shape[1])
    _fused_add_rmsnorm_kernel[(x.shape[0],)](
        x,
        residual,
        weight,
        out,
        new_residual,
        x.stride(0),
        residual.stride(0),
        out.stride(0),
        new_residual.stride(0),
        x.shape[1],
        eps,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out, new_residual


def fused_add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x.to(residual.dtype) + residual
    return rmsnorm_ref(new_residual, weight, eps), new_residual
