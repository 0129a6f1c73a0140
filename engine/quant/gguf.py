"""`quantization="gguf"`: a GGUF file's Q4_0 / Q4_1 / Q8_0 linear weights served as they are.

Each linear layer whose checkpoint tensors are all 4-bit (Q4_0 and Q4_1 mix: both become
w = q * scale + min) or all Q8_0 gets a `GGUFLinearMethod`; its weight arrives as GGUF block
rows (`engine.gguf.quant.GGUFRows`, from `engine.gguf.native`'s weight source) and is repacked
into the weight-only kernels' layout (engine.kernels.w4a16), one TP shard at a time, never as a
float matrix. Other layers (a K-quant or float tensor, or a fused layer mixing 4- and 8-bit
shards) keep the unquantized method and load dequantized, as do the embeddings, the LM head
and the norms.

Parameters: qweight (int32 [out, in // 8], or int8 [out, in]), scales and mins
([out, in // 32]) in float32 on the CPU and float16 on CUDA: GGUF's block scales are float16
values, so both are exact, and the kernel widens them to float32 in registers.
`apply` runs the Triton kernel on CUDA. Elsewhere (the CPU, where no kernel runs) the layer
also keeps `dequantized`, float32 [out, in] filled at load from the repacked shard with the
reference's arithmetic (engine.kernels.w4a16.dequantize_int4, never from the file's floats), and
multiplies as `w4a16_linear_ref` does: the same numbers without dequantizing every layer on
every step (5x slower). CPU runs check the repacking, the loader and the math, not memory.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import EngineConfigError, ModelLoadError
from engine.gguf.quant import GROUP_SIZE, GGUFRows, repack
from engine.kernels.w4a16 import dequantize_int4, w4a16_linear
from engine.kernels.w8a16 import dequantize_int8, w8a16_linear
from engine.layers.linear import LinearBase, LinearMethod, SlotKind, WeightSlot


def _empty(layer: LinearBase, *shape: int, dtype: torch.dtype) -> nn.Parameter:
    data = torch.empty(*shape, dtype=dtype, device=layer.params_device)
    return nn.Parameter(data, requires_grad=False)


def scales_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA (GGUF's own scale type: exact, 2 bytes), float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


class GGUFLinearMethod(LinearMethod):
    """A layer's GGUF blocks, repacked: `bits` 4 (Q4_0 / Q4_1) or 8 (Q8_0), group size 32."""

    name = "gguf"

    def __init__(self, bits: int) -> None:
        assert bits in (4, 8), bits
        self.bits = bits

    def create_weights(self, layer: LinearBase) -> dict[str, WeightSlot]:
        """qweight takes the checkpoint's `weight` (as GGUF rows); scales and mins are filled
        while it loads. Raises EngineConfigError when a TP shard's columns cut a block."""
        if layer.in_local % GROUP_SIZE:
            raise EngineConfigError(
                f"quantization: 'gguf' needs each TP shard of {layer.in_features} input "
                f"features to hold whole blocks of {GROUP_SIZE} (got {layer.in_local})"
            )
        out, k = layer.out_local, layer.in_local
        if self.bits == 4:
            qweight = _empty(layer, out, k // 8, dtype=torch.int32)
        else:
            qweight = _empty(layer, out, k, dtype=torch.int8)
        dtype = scales_dtype(layer.params_device)
        slots = {
            "qweight": WeightSlot(qweight, SlotKind.MATRIX, "weight"),
            "scales": WeightSlot(
                _empty(layer, out, k // GROUP_SIZE, dtype=dtype), SlotKind.DERIVED
            ),
        }
        if self.bits == 4:
            mins = _empty(layer, out, k // GROUP_SIZE, dtype=dtype)
            slots["mins"] = WeightSlot(mins, SlotKind.DERIVED)
        if layer.params_device.type != "cuda":
            dequantized = _empty(layer, out, k, dtype=torch.float32)
            slots["dequantized"] = WeightSlot(dequantized, SlotKind.DERIVED)
        return slots

    def load(self, layer: LinearBase, name: str, row: int, loaded: torch.Tensor) -> None:
        """`loaded`: GGUFRows of this rank's rows and columns (typed as the seam's tensor)."""
        rows: object = loaded
        if name != "qweight" or not isinstance(rows, GGUFRows):
            raise ModelLoadError(
                f"{type(layer).__name__} {name}: quantization 'gguf' loads GGUF blocks, got "
                f"{type(rows).__name__} (serve a .gguf file, or leave quantization unset)"
            )
        packed = repack(rows.blocks, rows.ggml_type)
        if packed.bits != self.bits:
            raise ModelLoadError(
                f"{type(layer).__name__}: a {rows.ggml_type.name} shard in a {self.bits}-bit layer"
            )
        dst = slice(row, row + rows.shape[0])
        layer.slot("qweight").data[dst] = packed.qweight
        layer.slot("scales").data[dst] = packed.scales
        if packed.mins is not None:
            layer.slot("mins").data[dst] = packed.mins
        if getattr(layer, "dequantized", None) is not None:
            scales = layer.slot("scales").data[dst]
            if packed.mins is None:
                w = dequantize_int8(packed.qweight, scales, GROUP_SIZE)
            else:
                w = dequantize_int4(
                    packed.qweight, scales, layer.slot("mins").data[dst], GROUP_SIZE
                )
            layer.slot("dequantized").data[dst] = w

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None, fp32_out: bool = False
    ) -> torch.Tensor:
        """y = x W^T (+ bias) in x's dtype; `fp32_out` widens that result (rounded once to x's
        dtype first: the kernel writes x's dtype)."""
        flat = x.reshape(-1, x.shape[-1])
        qweight, scales = layer.slot("qweight"), layer.slot("scales")
        if not flat.is_cuda:  # w4a16_linear_ref's product, its dequantization done at load
            y = (flat.to(torch.float32) @ layer.slot("dequantized").t()).to(x.dtype)
        elif self.bits == 4:
            y = w4a16_linear(flat, qweight, scales, layer.slot("mins"), GROUP_SIZE)
        else:
            y = w8a16_linear(flat, qweight, scales, GROUP_SIZE)
        y = y.view(*x.shape[:-1], -1)
        if bias is not None:
            y = y + bias
        return y.float() if fp32_out else y
