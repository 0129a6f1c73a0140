"""RMSNorm, optionally fused with the residual add (Triton on CUDA, torch elsewhere).

Knows nothing of tensor parallelism: under TP its input is an all-reduced tensor like any other.
Where the all-reduce is fused into the norm, a TP pass over the built model swaps the norm for
its fused form (engine.distributed.tp_pass); this module is unchanged by it.

`rmsnorm_ref` is the one torch reference of RMSNorm (the Triton kernels' tests use it too): it
lives here because this module imports neither Triton nor torch.distributed.
"""

from __future__ import annotations

import torch
from torch import nn


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face Llama semantics: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm(x + residual), x + residual)` in the residual's dtype (x may be a float32
    row-parallel sum: rounded to that dtype before the add). Triton on CUDA, torch elsewhere."""
    if x.is_cuda and x.shape[-1] == weight.shape[0] and x.dim() == 2:
        from engine.kernels.fused_add_rmsnorm import fused_add_rmsnorm

        return fused_add_rmsnorm(x, residual, weight, eps)
    residual = x.to(residual.dtype) + residual
    return rmsnorm_ref(residual, weight, eps), residual


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm(x)`, or with a residual `add_rmsnorm(x, residual)`: (normed, new residual)."""
        if residual is not None:
            return add_rmsnorm(x, residual, self.weight, self.eps)
        if x.is_cuda and x.shape[-1] == self.weight.shape[0] and x.dim() == 2:
            from engine.kernels.fused_add_rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps)
        return rmsnorm_ref(x, self.weight, self.eps)
