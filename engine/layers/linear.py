"""Linear layers that shard themselves over the process's TP group, and the seam that quantizes them.

Model files use these as if TP did not exist: at TP = 1 they are plain linears. Column-parallel
layers split the output features; row-parallel layers split the input features and all-reduce
their output (the one collective of an attention or MLP block).

What a layer stores and how it multiplies is its `LinearMethod`: the unquantized method (a weight
in the model dtype, `F.linear`) unless a quantization pass over the built model (engine.quant)
gave it another. The layer owns the TP slicing: each checkpoint-facing parameter carries a
`weight_loader(param, src, shard_id)` that reads only this rank's rows (and, row-parallel, its
columns) of the checkpoint tensor and hands them to the method, which stores them its way.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import get_tp_group
from engine.errors import ModelLoadError
from engine.layers.weight_source import WeightSource, copy_into, read_all, shape_of


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class SlotKind(Enum):
    """How a method parameter meets the checkpoint."""

    MATRIX = "matrix"  # a [N, K] checkpoint tensor: this rank's rows (and row-parallel columns)
    CHANNEL = "channel"  # one value per output row [N] (or [N, 1]; a scalar broadcasts)
    DERIVED = "derived"  # not in the checkpoint: the method fills it while loading another slot


class WeightSlot(NamedTuple):
    """A parameter a method creates. `checkpoint_name` is the checkpoint tensor's leaf name
    where it differs from the parameter's (int4's `qweight` loads from a float `weight`)."""

    param: nn.Parameter
    kind: SlotKind
    checkpoint_name: str | None = None


class LinearMethod(ABC):
    """How a linear layer stores its weight, loads checkpoint shards and computes y = x W^T + b.

    Contract: `create_weights` returns the layer's parameters by name (the layer registers them)
    for a local weight of `layer.out_local` x `layer.in_local`, in `layer.params_dtype` on
    `layer.params_device` (a grouped method also sets `layer.group_size`); it raises
    EngineConfigError naming `quantization` for a layer it cannot hold (a TP shard that would
    cut a quantization group). `load(layer, name, row, t)`
    stores `t`, this rank's rows [row, row + len(t)) of checkpoint slot `name` (the layer has
    checked the shape: [rows, layer.in_local] for a MATRIX slot, [rows] for a CHANNEL one),
    raising ModelLoadError on a dtype it cannot take.
    `apply` never changes state (CUDA-graph safe); `fp32_out` asks for the product in float32
    (TP's float32 reduction; a method may round to x's dtype first, documented where it does).
    """

    name = "unquantized"

    @abstractmethod
    def create_weights(self, layer: LinearBase) -> dict[str, WeightSlot]: ...

    @abstractmethod
    def load(self, layer: LinearBase, name: str, row: int, loaded: torch.Tensor) -> None: ...

    @abstractmethod
    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None, fp32_out: bool = False
    ) -> torch.Tensor: ...


class UnquantizedLinearMethod(LinearMethod):
    """The weight in the model dtype; `F.linear` (what every layer did before quantization)."""

    def create_weights(self, layer: LinearBase) -> dict[str, WeightSlot]:
        weight = torch.empty(
            layer.out_local, layer.in_local, dtype=layer.params_dtype, device=layer.params_device
        )
        return {"weight": WeightSlot(nn.Parameter(weight, requires_grad=False), SlotKind.MATRIX)}

    def load(self, layer: LinearBase, name: str, row: int, loaded: torch.Tensor) -> None:
        dst = layer.slot("weight").data.narrow(0, row, loaded.shape[0])
        copy_into(dst, loaded, f"{type(layer).__name__} {name}")

    def apply(
        self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None, fp32_out: bool = False
    ) -> torch.Tensor:
        if fp32_out and x.dtype != torch.float32:
            assert bias is None, "the float32 partial sum carries no bias"
            return _linear_fp32_out(x, layer.slot("weight"))
        return F.linear(x, layer.slot("weight"), bias)


UNQUANTIZED = UnquantizedLinearMethod()


class LinearBase(nn.Module):
    """A local [out_local, in_local] linear whose parameters come from its `method`.

    Subclasses say which checkpoint rows a shard id maps to (`_rows`) and which columns this
    rank reads (`_cols`); the method never sees TP.
    """

    def __init__(self, in_features: int, in_local: int, out_local: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.in_local, self.out_local = in_features, in_local, out_local
        # Where and in which dtype the model was built (a later set_method keeps them).
        self.params_dtype = torch.get_default_dtype()
        self.params_device = torch.empty(0).device
        self.bias = _param(out_local) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = functools.partial(  # type: ignore[attr-defined]
                self._load, "bias", SlotKind.CHANNEL
            )
        self.group_size = 0  # a grouped method's group along the input features (0: none)
        self.method: LinearMethod = UNQUANTIZED
        self._slots: tuple[str, ...] = ()
        self.set_method(UNQUANTIZED)

    def slot(self, name: str) -> nn.Parameter:
        """The method's parameter `name` (typed access for methods)."""
        param = self._parameters[name]
        assert param is not None, name
        return param

    def set_method(self, method: LinearMethod) -> None:
        """Replace the weight storage by `method`'s (empty until loaded; the bias is kept)."""
        for name in self._slots:
            delattr(self, name)
        slots = method.create_weights(self)
        for name, slot in slots.items():
            if slot.kind is SlotKind.DERIVED:
                slot.param.derived_on_load = True  # type: ignore[attr-defined]
            else:
                loader = functools.partial(self._load, name, slot.kind)
                slot.param.weight_loader = loader  # type: ignore[attr-defined]
            if slot.checkpoint_name is not None:
                slot.param.checkpoint_name = slot.checkpoint_name  # type: ignore[attr-defined]
            self.register_parameter(name, slot.param)
        self.method, self._slots = method, tuple(slots)

    def _rows(self, shard_id: object) -> tuple[int, int, int]:
        """(first local row, first checkpoint row, number of rows) of shard `shard_id`."""
        raise NotImplementedError

    def _cols(self) -> tuple[int, int] | None:
        """(first checkpoint column, number of columns) this rank reads; None: all of them."""
        return None

    def _load(
        self,
        name: str,
        kind: SlotKind,
        param: nn.Parameter,
        src: torch.Tensor | WeightSource,
        shard_id: object = None,
    ) -> None:
        row, start, num_rows = self._rows(shard_id)
        what = f"{type(self).__name__} {name}" + ("" if shard_id is None else f" {shard_id}")
        if kind is SlotKind.MATRIX:
            loaded = read_block(src, start, num_rows, self._cols())
            check_loaded(loaded, (num_rows, self.in_local), what)
        else:
            loaded = read_channel(src, start, num_rows)
            check_loaded(loaded, (num_rows,), what)
        if name == "bias":
            assert self.bias is not None
            copy_into(self.bias.data.narrow(0, row, num_rows), loaded, what)
        else:
            self.method.load(self, name, row, loaded)


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = get_tp_group()
        assert out_features % tp.size == 0, f"{out_features} output features over TP {tp.size}"
        self.tp_rank, self.tp_size = tp.rank, tp.size
        super().__init__(in_features, in_features, out_features // tp.size, bias)

    def _rows(self, shard_id: object) -> tuple[int, int, int]:
        return 0, self.tp_rank * self.out_local, self.out_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one matrix (e.g. gate | up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def _rows(self, shard_id: object) -> tuple[int, int, int]:
        assert isinstance(shard_id, int), shard_id
        size = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        return offset, self.tp_rank * size, size


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q | k | v projection. Query heads split across ranks; KV heads split too, or
    replicated when the TP size exceeds their number (each rank then holds one KV head)."""

    def __init__(
        self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        tp = get_tp_group()
        assert num_heads % tp.size == 0, f"{num_heads} query heads over TP {tp.size}"
        assert num_kv_heads % tp.size == 0 or tp.size % num_kv_heads == 0
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        # The rank's first KV head in the checkpoint (replicas share it).
        self.kv_head_start = tp.rank * num_kv_heads // tp.size
        out_local = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, out_local * tp.size, bias)

    def _rows(self, shard_id: object) -> tuple[int, int, int]:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, self.tp_rank * q, q
        kv_start = self.kv_head_start * self.head_dim
        if shard_id == "k":
            return q, kv_start, kv
        assert shard_id == "v", shard_id
        return q + kv, kv_start, kv


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W's columns (input features) split; the partial sums are all-reduced.

    `reduce_output` False: forward returns this rank's unreduced partial sum (no bias), for a
    consumer that sums it itself. Only a TP pass over the built model sets it, together with
    that consumer (engine.distributed.tp_pass: the all-reduce fused with the residual add and
    RMSNorm); model files always see the reduced output. Either way forward returns a tensor.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, reduce_output: bool = True
    ) -> None:
        tp = get_tp_group()
        assert in_features % tp.size == 0, f"{in_features} input features over TP {tp.size}"
        assert reduce_output or not bias, "an unreduced output cannot carry the bias"
        self.tp = tp
        self.reduce_output = reduce_output
        super().__init__(in_features, in_features // tp.size, out_features, bias)

    def _rows(self, shard_id: object) -> tuple[int, int, int]:
        return 0, 0, self.out_local

    def _cols(self) -> tuple[int, int] | None:
        return self.tp.rank * self.in_local, self.in_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, out]: in x's dtype, or in float32 when the partial sums were reduced in float32
        (Reduction.fp32_max_rows); the consumer, the residual add, rounds it then, so that no
        separate cast runs (engine.layers.norm). Unreduced (`reduce_output` False): x's dtype."""
        if not self.reduce_output:
            return self.method.apply(self, x, None)
        fp32 = (
            self.tp.size > 1
            and x.dtype != torch.float32
            and x.shape[0] <= self.tp.reduction.fp32_max_rows
        )
        y = self.tp.all_reduce(self.method.apply(self, x, None, fp32_out=fp32))
        return y if self.bias is None else y + self.bias


def read_block(
    src: torch.Tensor | WeightSource, start: int, num_rows: int, cols: tuple[int, int] | None
) -> torch.Tensor:
    """Rows [start, start + num_rows) (and columns `cols`, else all) of a 2-D checkpoint
    tensor, reading only those bytes when `src` is lazy."""
    rows = slice(start, start + num_rows)
    index = (rows,) if cols is None else (rows, slice(cols[0], cols[0] + cols[1]))
    return src[index]


def read_channel(src: torch.Tensor | WeightSource, start: int, num_rows: int) -> torch.Tensor:
    """Rows [start, start + num_rows) of a per-row vector ([N] or [N, 1]); a one-element
    tensor (a per-tensor scale) is broadcast to the rows."""
    shape = shape_of(src)
    if len(shape) <= 1 and (not shape or shape[0] == 1) and num_rows != 1:
        whole = read_all(src) if shape else src[()]  # a 0-dim safetensors slice takes no slice
        return whole.reshape(1).expand(num_rows)
    if len(shape) == 2 and shape[1] == 1:
        return read_block(src, start, num_rows, None).reshape(-1)
    return read_block(src, start, num_rows, None)


def check_loaded(loaded: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    """ModelLoadError unless a checkpoint shard has the shape its slot expects."""
    if tuple(loaded.shape) != shape:
        raise ModelLoadError(
            f"{what}: checkpoint shape {tuple(loaded.shape)} != model shape {shape}"
        )


def _linear_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T accumulated and returned in float32 (no rounding to x's dtype before the sum)."""
    if x.is_cuda:
        flat = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
        return flat.view(*x.shape[:-1], -1)
    return F.linear(x.float(), weight.float())  # CPU has no mixed-dtype matmul: small models only
