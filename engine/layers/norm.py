"""RMSNorm, optionally fused with the residual add (Triton on CUDA, torch elsewhere)."""

from __future__ import annotations

import torch
from torch import nn


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face Llama semantics: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`norm(x)`, or with a residual `(norm(x + residual), x + residual)` in the residual's
        dtype (x may be a float32 row-parallel sum: rounded to that dtype before the add)."""
        if x.is_cuda and x.shape[-1] == self.weight.shape[0] and x.dim() == 2:
            from engine.kernels.fused_add_rmsnorm import fused_add_rmsnorm, rmsnorm

            if residual is None:
                return rmsnorm(x, self.weight, self.eps)
            return fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return rmsnorm_ref(x, self.weight, self.eps)
        residual = x.to(residual.dtype) + residual
        return rmsnorm_ref(residual, self.weight, self.eps), residual
