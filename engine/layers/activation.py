"""SiLU-and-multiply over a fused gate | up projection (Triton on CUDA, torch elsewhere).

`silu_and_mul_ref` is the one torch reference of the activation (the Triton kernel's tests use
it too): it lives here because this module imports no Triton.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if x.is_cuda:
        from engine.kernels.silu_and_mul import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    return silu_and_mul_ref(x)
