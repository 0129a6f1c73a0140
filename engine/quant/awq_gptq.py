"""AWQ and GPTQ 4-bit checkpoints served as stored: each linear's packed words repacked on load.

Supported (engine.quant.names.check_packed_int4 refuses the rest at start-up, naming the field):
- AWQ "gemm" (AutoAWQ), 4 bits, zero points, groups of 32 / 64 / 128;
- GPTQ v1 ("gptq": each zero point stored minus 1) and v2 ("gptq_v2"), 4 bits, symmetric or
  not, groups of 32 / 64 / 128, `desc_act` false (or with `static_groups`: g_idx is then
  k // G, which every layer's g_idx is checked to be while it loads).
Layers whose checkpoint holds a float `weight` (AWQ's `modules_to_not_convert`) stay unquantized.

The formats, for a layer with K input and N output features, groups of G along K:
    GPTQ  qweight int32 [K // 8, N]       nibble i of word [j, n] is q[8j + i, n]
          qzeros  int32 [K // G, N // 8]  nibble i of word [g, c] is z[g, 8c + i] (v1: z - 1)
          scales  fp16  [K // G, N];  g_idx int32 [K] (group of input feature k)
    AWQ   qweight int32 [K, N // 8]       nibble i of word [k, c] is q[k, 8c + AWQ_ORDER[i]]
          qzeros  int32 [K // G, N // 8]  the same interleaved order;  scales fp16 [K // G, N]
    both: w[n, k] = (q[k, n] - z[k // G, n]) * scales[k // G, n]
The W4A16 layout (engine.kernels.w4a16) takes w = q * scales + mins, so mins = -z * scales.
GPTQ's qweight words already hold 8 consecutive k of one n in nibble order: the W4A16 qweight
is its transpose. AWQ's words hold 8 n of one k, so its nibbles are unpacked to integers and
repacked along K. Only integer tensors and the [N, K // G] scales are handled; no float
weight matrix is ever built.

Scales and mins are float32 off CUDA, where mins = -z * scale (z <= 16, scale a float16) is
exact and the dequantized weights equal the format's formula bit for bit; on CUDA both are
float16 (half the bytes): the checkpoint's scales exactly, mins rounded to float16 (relative
error 2^-11 of z * scale, under 1/100 of a quantization step).

Loading (engine.weights, for a checkpoint whose config.json says awq / gptq): `packed_tensors`
gives each layer with a `qweight` the `PackedInt4Method`, then yields each such layer's four
tensors as one lazy `PackedSource` under the name `<layer>.weight`; the layer's TP slicing
indexes it by (rows, columns) of the logical [N, K] weight and gets `PackedRows`: the stored
words, scales and zeros of exactly that block, repacked on the layer's device by the method.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import EngineConfigError, ModelLoadError
from engine.kernels.w4a16 import pack_int4
from engine.layers.linear import LinearBase, SlotKind, WeightSlot
from engine.layers.weight_source import WeightSource
from engine.progress import progress_bar
from engine.quant.gguf import scales_dtype
from engine.quant.int4 import Int4LinearMethod
from engine.quant.names import packed_format

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + AWQ_ORDER[i]
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_SHIFTS = tuple(range(0, 32, 4))


class PackedFormat(NamedTuple):
    """What the repacking needs from config.json's quantization_config."""

    method: str  # "awq" or "gptq"
    group_size: int
    zero_offset: int  # added to each stored zero point: 1 for GPTQ v1, else 0

    @staticmethod
    def from_config(qc: dict[str, Any]) -> PackedFormat:
        """From a quantization_config that names.check_packed_int4 accepted."""
        method = str(qc["quant_method"])
        offset = 1 if method == "gptq" and packed_format(qc) == "gptq" else 0
        return PackedFormat(method, int(qc["group_size"]), offset)


class PackedRows(NamedTuple):
    """Rows [r0, r1) and columns [c0, c1) of one packed layer, as stored (see the module
    docstring for each format's tensors); `shape` is the logical (r1 - r0, c1 - c0) the layer
    checks, `first_col` is c0 (g_idx is checked against it). GPTQ's g_idx may be None."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    shape: tuple[int, int]
    first_col: int


class PackedSource:
    """A lazy view of one packed layer for its `weight_loader`: `get_shape()` is the logical
    [N, K]; indexing with (rows, columns) slices reads only those words, zeros and scales.
    Raises ModelLoadError for a block whose rows are not whole 8-column words or whose columns
    cut a group."""

    def __init__(self, name: str, parts: dict[str, WeightSource], fmt: PackedFormat) -> None:
        self.name, self.parts, self.fmt = name, parts, fmt
        rows, packed_k = parts["scales"].get_shape()[1], parts["qweight"].get_shape()[0]
        self.shape = (rows, packed_k * 8 if fmt.method == "gptq" else packed_k)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> PackedRows:
        index = index if isinstance(index, tuple) else (index,)
        r0, r1, _ = index[0].indices(self.shape[0])
        c0, c1, _ = (index[1] if len(index) > 1 else slice(None)).indices(self.shape[1])
        group = self.fmt.group_size
        if r0 % 8 or r1 % 8 or c0 % group or c1 % group:
            raise ModelLoadError(
                f"{self.name}: rows [{r0}, {r1}) and columns [{c0}, {c1}) are not whole "
                f"8-row words and groups of {group} of the packed {self.fmt.method} tensors"
            )
        words, groups = slice(r0 // 8, r1 // 8), slice(c0 // group, c1 // group)
        if self.fmt.method == "gptq":
            qweight = self.parts["qweight"][c0 // 8 : c1 // 8, r0:r1]
        else:
            qweight = self.parts["qweight"][c0:c1, words]
        g_idx = self.parts["g_idx"][c0:c1] if "g_idx" in self.parts else None
        return PackedRows(
            qweight,
            self.parts["qzeros"][groups, words],
            self.parts["scales"][groups, r0:r1],
            g_idx,
            (r1 - r0, c1 - c0),
            c0,
        )


def unpack_nibbles(words: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C] int32 words -> [R, 8 C] int32 values 0..15: value 8c + order[i] is nibble i of
    word c (the identity order: nibble i is value 8c + i)."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=words.device)
    nibbles = (words.unsqueeze(-1) >> shifts).bitwise_and_(0xF)
    inverse = [order.index(j) for j in range(8)]  # value j of a word sits in nibble inverse[j]
    if inverse != list(range(8)):
        nibbles = nibbles[..., inverse]
    return nibbles.reshape(words.shape[0], -1)


def repack(
    rows: PackedRows, fmt: PackedFormat, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight int32 [n, k // 8], scales, mins [n, k // G] in `dtype`) in the W4A16 layout of
    one block, computed on `device`. Raises ModelLoadError for a GPTQ g_idx other than k // G."""
    order = AWQ_ORDER if fmt.method == "awq" else tuple(range(8))
    qzeros = rows.qzeros.to(device=device, dtype=torch.int32)
    zeros = unpack_nibbles(qzeros, order).t() + fmt.zero_offset  # [n, k // G]
    scales = rows.scales.to(device=device, dtype=torch.float32).t()
    mins = (-zeros.to(torch.float32) * scales).to(dtype)
    packed = rows.qweight.to(device=device, dtype=torch.int32)
    if fmt.method == "gptq":
        _check_g_idx(rows, fmt.group_size)
        qweight = packed.t().contiguous()
    else:
        qweight = pack_int4(unpack_nibbles(packed, AWQ_ORDER).t())
    return qweight, scales.to(dtype).contiguous(), mins.contiguous()


def _check_g_idx(rows: PackedRows, group: int) -> None:
    if rows.g_idx is None:
        return
    cols = torch.arange(rows.first_col, rows.first_col + rows.shape[1], dtype=torch.int64)
    if not torch.equal(rows.g_idx.to(torch.int64), cols // group):
        raise ModelLoadError(
            f"gptq: g_idx is not k // {group} (act-order groups, config.json "
            "quantization_config.desc_act): only contiguous groups are served"
        )


class PackedInt4Method(Int4LinearMethod):
    """An AWQ / GPTQ layer's 4-bit weights repacked as they load (the int4 method's storage,
    kernel and `apply`; the checkpoint's group size). `name` is the format's ("awq", "gptq")."""

    def __init__(self, fmt: PackedFormat) -> None:
        super().__init__(fmt.group_size)
        self.fmt = fmt
        self.name = fmt.method

    def create_weights(self, layer: LinearBase) -> dict[str, WeightSlot]:
        """Int4's slots with scales and mins in `scales_dtype` (float32 off CUDA). Raises
        EngineConfigError naming `quantization` where a TP shard would cut a group."""
        if layer.in_local % self.fmt.group_size:
            raise EngineConfigError(
                f"quantization: {self.fmt.method!r} groups of {self.fmt.group_size} do not "
                f"divide the {layer.in_local} input features of each TP shard of a layer "
                f"({layer.in_features} in all): a shard boundary would cut a group"
            )
        slots = super().create_weights(layer)
        assert layer.group_size == self.fmt.group_size, layer.group_size
        dtype = scales_dtype(layer.params_device)
        for name in ("scales", "mins"):
            data = slots[name].param.data.to(dtype)
            slots[name] = WeightSlot(nn.Parameter(data, requires_grad=False), SlotKind.DERIVED)
        return slots

    def load(self, layer: LinearBase, name: str, row: int, loaded: torch.Tensor) -> None:
        """`loaded`: PackedRows of this rank's block (typed as the seam's tensor)."""
        rows: object = loaded
        if name != "qweight" or not isinstance(rows, PackedRows):
            raise ModelLoadError(
                f"{type(layer).__name__} {name}: a {self.fmt.method} layer loads packed 4-bit "
                f"tensors, got {type(rows).__name__} (a layer mixing float and packed shards?)"
            )
        qweight = layer.slot("qweight")
        scales = layer.slot("scales")
        packed = repack(rows, self.fmt, qweight.device, scales.dtype)
        dst = slice(row, row + rows.shape[0])
        for slot_name, value in zip(("qweight", "scales", "mins"), packed):
            layer.slot(slot_name).data[dst] = value


def read_format(model_dir: Path) -> PackedFormat:
    """The PackedFormat of config.json's quantization_config in `model_dir`."""
    hf = json.loads((model_dir / "config.json").read_text())
    return PackedFormat.from_config(hf["quantization_config"])


def _target(model: nn.Module, name: str) -> str:
    """Our parameter's name for checkpoint tensor `name` (the model's `stacked_params`)."""
    for ckpt_part, (our_part, _) in getattr(model, "stacked_params", {}).items():
        if ckpt_part in name:
            return name.replace(ckpt_part, our_part)
    return name


def apply_packed_methods(model: nn.Module, layer_names: list[str], fmt: PackedFormat) -> None:
    """Give the linear layer each checkpoint layer name (`...q_proj`) maps to the method of
    `fmt`. Raises ModelLoadError for packed tensors of a module that is not a linear layer."""
    method = PackedInt4Method(fmt)
    for name in layer_names:
        module_name = _target(model, f"{name}.weight").rpartition(".")[0]
        module = model.get_submodule(module_name)
        if not isinstance(module, LinearBase):
            raise ModelLoadError(f"{name}.qweight: packed 4-bit weights of a non-linear module")
        if module.method is not method:
            module.set_method(method)


def packed_tensors(
    model: nn.Module, model_dir: Path, files: list[Path], show_progress: bool
) -> Iterator[tuple[str, object]]:
    """Each checkpoint tensor by name for engine.weights' loader, lazy: a packed layer's
    qweight / qzeros / scales / g_idx as one PackedSource named `<layer>.weight`, every other
    tensor as its safetensors slice. Gives the packed layers their method before it returns
    (the caller lists the parameters after). Raises ModelLoadError for a layer with a qweight
    but no qzeros or scales."""
    fmt = read_format(model_dir)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    where = {name: handle for handle in handles for name in handle.keys()}
    layers = sorted(n.removesuffix(".qweight") for n in where if n.endswith(".qweight"))
    for layer in layers:
        for part in ("qzeros", "scales"):
            if f"{layer}.{part}" not in where:
                raise ModelLoadError(f"missing weights in the checkpoint: {layer}.{part}")
    apply_packed_methods(model, layers, fmt)
    return _iter_packed(where, layers, fmt, show_progress)


def _iter_packed(
    where: dict[str, Any], layers: list[str], fmt: PackedFormat, show_progress: bool
) -> Iterator[tuple[str, object]]:
    packed = {f"{layer}.{part}" for layer in layers for part in _PARTS}
    with progress_bar(show_progress) as progress:
        task = progress.add_task("loading weights", total=len(where))
        for layer in layers:
            parts = {
                p: where[f"{layer}.{p}"].get_slice(f"{layer}.{p}")
                for p in _PARTS
                if f"{layer}.{p}" in where
            }
            yield f"{layer}.weight", PackedSource(layer, parts, fmt)
            progress.advance(task, len(parts))
        for name, handle in where.items():
            if name not in packed:
                yield name, handle.get_slice(name)
                progress.advance(task)
