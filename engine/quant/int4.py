"""W4A16 linears: 4-bit weights, round-to-nearest asymmetric, per group of input columns.

Storage (engine.kernels.w4a16's layout, shared with the GGUF repacking):
    qweight int32 [N, K // 8]  nibble i (bits 4i..4i+3) of word j holds q[n, 8j + i] in 0..15
    scales, mins [N, K // G]   in the activation dtype;  w[n, k] = q[n, k] * scales[n, k // G]
                               + mins[n, k // G]
Quantized on load from float weights (a checkpoint or dummy weights): per group,
scale = (max - min) / 15 and min are rounded to their storage dtype first, and q = round((w -
min) / scale) uses those rounded values, so that dequantizing reproduces what was chosen.

The group size is 128, or the largest of 64 and 32 that divides a layer's input features where
128 does not (SmolLM2's 576 -> 64). Row-parallel shards split the input columns: each rank's
shard must hold whole groups, else EngineConfigError naming `quantization` (a shard boundary
never cuts a group, so any TP size quantizes exactly as TP = 1 does). On CUDA the product runs
in Q3's Triton kernel (`w4a16_linear`), elsewhere in its torch reference.
"""

from __future__ import annotations

import torch

from engine.errors import EngineConfigError, ModelLoadError
from engine.kernels.w4a16 import GROUP_SIZES, pack_int4, w4a16_linear, w4a16_linear_ref
from engine.layers.linear import LinearBase, LinearMethod, SlotKind, WeightSlot

DEFAULT_GROUP_SIZE = 128
MAX_Q = 15


def layer_group_size(in_features: int, in_local: int, preferred: int, tp_size: int) -> int:
    """The group size of a layer with `in_features` input columns, `in_local` of them on each
    rank. Raises EngineConfigError naming `quantization` when no group size fits."""
    sizes = [g for g in GROUP_SIZES if g <= preferred and in_features % g == 0]
    if not sizes:
        raise EngineConfigError(
            f"quantization: int4 groups of {preferred} (or {GROUP_SIZES}) do not divide the "
            f"{in_features} input features of a layer"
        )
    group = max(sizes)
    if in_local % group:
        raise EngineConfigError(
            f"quantization: int4 group size {group} does not divide the {in_local} input "
            f"features of each TP shard ({in_features} over TP {tp_size}): a shard boundary "
            "would cut a group; use a TP size whose shards hold whole groups"
        )
    return group


def quantize_int4(
    w: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight int32 [R, C // 8], scales [R, C // G], mins [R, C // G] in `dtype`) of w [R, C]."""
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    mins = lo.to(dtype)
    scales = ((hi - lo) / MAX_Q).to(dtype)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = torch.round((groups - mins.float()[..., None]) / safe[..., None]).clamp(0, MAX_Q)
    return pack_int4(q.reshape(rows, cols).to(torch.int32)), scales, mins


def int4_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int
) -> torch.Tensor:
    """y [M, N] in x's dtype: the Triton kernel on CUDA, the torch reference elsewhere."""
    if x.is_cuda:
        return w4a16_linear(x, qweight, scales, mins, group)
    return w4a16_linear_ref(x, qweight, scales, mins, group)


class Int4LinearMethod(LinearMethod):
    """Round-to-nearest 4-bit weights quantized on load (a float checkpoint or dummy weights)."""

    name = "int4"

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.group_size = group_size

    def create_weights(self, layer: LinearBase) -> dict[str, WeightSlot]:
        tp_size = layer.in_features // layer.in_local
        group = layer_group_size(layer.in_features, layer.in_local, self.group_size, tp_size)
        layer.group_size = group
        n, k, dev = layer.out_local, layer.in_local, layer.params_device
        qweight = torch.zeros(n, k // 8, dtype=torch.int32, device=dev)
        scales = torch.zeros(n, k // group, dtype=layer.params_dtype, device=dev)
        mins = torch.zeros(n, k // group, dtype=layer.params_dtype, device=dev)
        return {
            "qweight": WeightSlot(_frozen(qweight), SlotKind.MATRIX, checkpoint_name="weight"),
            "scales": WeightSlot(_frozen(scales), SlotKind.DERIVED),
            "mins": WeightSlot(_frozen(mins), SlotKind.DERIVED),
        }

    def load(self, layer: LinearBase, name: str, row: int, loaded: torch.Tensor) -> None:
        assert name == "qweight", name
        if not loaded.is_floating_point() or loaded.element_size() < 2:
            raise ModelLoadError(
                f"{type(layer).__name__} weight: int4 quantizes float weights on load; the "
                f"checkpoint holds {loaded.dtype}"
            )
        qweight = layer.slot("qweight")
        packed = quantize_int4(loaded.to(qweight.device), layer.group_size, layer.params_dtype)
        rows = slice(row, row + loaded.shape[0])
        for slot_name, value in zip(("qweight", "scales", "mins"), packed):
            layer.slot(slot_name).data[rows] = value

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None, fp32_out: bool = False
    ) -> torch.Tensor:
        """`fp32_out`: the product is rounded to x's dtype first (the kernel writes x's dtype)."""
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        qweight, scales, mins = (layer.slot(n) for n in ("qweight", "scales", "mins"))
        y = int4_linear(flat, qweight, scales, mins, layer.group_size)
        if bias is not None:
            y = y + bias
        y = y.float() if fp32_out else y
        return y.view(*x.shape[:-1], -1)


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t, requires_grad=False)
