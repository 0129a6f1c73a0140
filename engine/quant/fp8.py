"""W8A8 FP8 linears: e4m3 weights with per-output-channel scales, activations quantized per token.

    w[n, :] ~ weight[n, :] * weight_scale[n]        (weight float8_e4m3fn [N, K], scale float32 [N])
    x[t, :] ~ xq[t, :] * x_scale[t]                 (computed on every call: amax / 448)
    y = (xq * x_scale) @ (weight * weight_scale)^T  accumulated in float32

On CUDA with FP8 tensor cores (compute capability >= 8.9) `torch._scaled_mm` runs it with
row-wise scales (scale_a [M, 1], scale_b [1, N], float32; bfloat16 output). Elsewhere the
reference dequantizes both operands and multiplies in float32: the same math.

Weights are quantized on load from a float checkpoint (or dummy weights), or loaded as they are
from a Hugging Face FP8 checkpoint (`weight` float8_e4m3fn + `weight_scale`, per tensor or per
channel; a per-tensor scale of a fused q | k | v is kept per shard, expanded to its rows). A
checkpoint's static `input_scale` is not used: activation scales are always dynamic.
"""

from __future__ import annotations

import torch

from engine.errors import EngineConfigError, ModelLoadError
from engine.layers.linear import LinearBase, LinearMethod, SlotKind, WeightSlot

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row or token keeps a finite scale
MIN_CAPABILITY = (8, 9)  # Ada and Hopper: FP8 tensor cores


def check_fp8_device(device: torch.device) -> None:
    """EngineConfigError naming `quantization` on a CUDA GPU without FP8 tensor cores (CPU runs
    the float32 reference)."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise EngineConfigError(
            f"quantization: 'fp8' needs FP8 tensor cores (compute capability >= 8.9); {name} "
            f"has {capability[0]}.{capability[1]}"
        )


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [R, C], scale float32 [R]) with w ~ q * scale[:, None], per row."""
    w = w.float()
    scale = (w.abs().amax(dim=-1) / FP8_MAX).clamp(min=_MIN_SCALE)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """y [M, N] float32: x quantized per token, both operands dequantized, a float32 product."""
    xq, x_scale = quantize_rows(x)
    xd = xq.float() * x_scale[:, None]
    return xd @ (weight.float() * weight_scale[:, None]).t()


def fp8_linear_cuda(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """y [M, N] bfloat16 by `torch._scaled_mm` (x [M, K] row-major; K and N multiples of 16)."""
    xq, x_scale = quantize_rows(x)
    return torch._scaled_mm(
        xq,
        weight.t(),  # [K, N] column-major, as the FP8 GEMM takes its second operand
        scale_a=x_scale.unsqueeze(1),
        scale_b=weight_scale.unsqueeze(0),
        out_dtype=torch.bfloat16,
    )


class Fp8LinearMethod(LinearMethod):
    """`prequantized`: the checkpoint holds the FP8 weights and their scales (config.json's
    quantization_config); else float weights are quantized per output row as they load."""

    name = "fp8"

    def __init__(self, prequantized: bool = False) -> None:
        self.prequantized = prequantized

    def create_weights(self, layer: LinearBase) -> dict[str, WeightSlot]:
        dev = layer.params_device
        weight = torch.empty(layer.out_local, layer.in_local, dtype=FP8, device=dev)
        scale = torch.ones(layer.out_local, dtype=torch.float32, device=dev)
        scale_kind = SlotKind.CHANNEL if self.prequantized else SlotKind.DERIVED
        return {
            "weight": WeightSlot(_frozen(weight), SlotKind.MATRIX),
            "weight_scale": WeightSlot(_frozen(scale), scale_kind),
        }

    def load(self, layer: LinearBase, name: str, row: int, loaded: torch.Tensor) -> None:
        rows = slice(row, row + loaded.shape[0])
        weight, scale = layer.slot("weight"), layer.slot("weight_scale")
        if name == "weight_scale":
            scale.data[rows] = loaded.to(torch.float32)
            return
        assert name == "weight", name
        if self.prequantized != (loaded.dtype == FP8):
            expected = "float8_e4m3fn" if self.prequantized else "floating-point"
            raise ModelLoadError(
                f"{type(layer).__name__} weight: the checkpoint holds {loaded.dtype}, expected "
                f"{expected} weights (quantization_config in config.json says which)"
            )
        if self.prequantized:
            weight.data[rows] = loaded.to(weight.device)
            return
        q, row_scales = quantize_rows(loaded.to(weight.device))
        weight.data[rows], scale.data[rows] = q, row_scales

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None, fp32_out: bool = False
    ) -> torch.Tensor:
        """On CUDA the product is rounded to bfloat16 before a `fp32_out` cast (the row-wise
        FP8 GEMM writes bfloat16 only); the reference stays in float32 throughout."""
        flat = x.reshape(-1, x.shape[-1])
        weight, scale = layer.slot("weight"), layer.slot("weight_scale")
        if x.is_cuda and flat.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0:
            y = fp8_linear_cuda(flat.contiguous(), weight, scale)
        else:
            y = fp8_linear_ref(flat, weight, scale)
        if bias is not None:
            y = y + bias
        y = y.to(torch.float32 if fp32_out else x.dtype)
        return y.view(*x.shape[:-1], -1)


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)
