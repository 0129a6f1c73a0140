"""8-bit weight-only linear (GGUF Q8_0 and kin): y = x @ w^T, w = q * scales[n, k // G].

    qweight int8 [N, K], scales [N, K // G] (any float dtype, widened to float32 in registers)

The kernels are `engine.kernels.w4a16`'s (their BITS constexpr picks the 8-bit tile load), with
the same dispatch: the GEMV of `engine.kernels.w4a16_gemv` for M <= 4 (int8 rows read along K in
16-byte loads, scale applied once per group), the split-K decode and GEMM paths above that, the
same configs and the same hazards; this module holds the 8-bit launcher and its torch reference.
"""

from __future__ import annotations

import torch

from engine.kernels.w4a16 import W4A16Config, check_quantized_args, launch_weight_only
from engine.kernels.w4a16_gemv import GemvConfig


def w8a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    config: W4A16Config | GemvConfig | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ w^T in x's dtype, w dequantized from int8 `qweight` [N, K] and
    `scales` [N, K // group_size]. Raises ValueError naming a bad argument."""
    check_quantized_args(x, qweight, scales, None, group_size, bits=8)
    return launch_weight_only(x, qweight, scales, None, group_size, 8, config)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """w [N, K] float32 = q * scale, in float32 (the kernel's arithmetic)."""
    n = qweight.shape[0]
    w = qweight.view(n, -1, group_size).to(torch.float32)
    return w.mul_(scales.to(torch.float32).unsqueeze(-1)).view(n, -1)


def w8a16_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The exact math in torch (any device): dequantized float32 weights, a float32 product,
    rounded once to x's dtype. Materialises w [N, K] in float32 on every call."""
    w = dequantize_int8(qweight, scales, group_size)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)
