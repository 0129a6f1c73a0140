"""Linear layers that shard themselves over the process's TP group.

Model files use these as if TP did not exist: at TP = 1 they are plain linears. Each parameter
carries a `weight_loader(param, src, shard_id)` that reads only this rank's slice of the checkpoint.
Column-parallel layers split the output features; row-parallel layers split the input features
and all-reduce their output (the one collective of an attention or MLP block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import get_tp_group
from engine.layers.weight_source import WeightSource, copy_into, read_all, read_narrow


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks; output stays sharded."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        tp = get_tp_group()
        assert out_features % tp.size == 0, f"{out_features} output features over TP {tp.size}"
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.out_local = out_features // tp.size
        self.weight = _param(self.out_local, in_features)
        self.weight.weight_loader = self._load  # type: ignore[attr-defined]
        self.bias = _param(self.out_local) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load  # type: ignore[attr-defined]

    def _load(
        self, param: nn.Parameter, src: torch.Tensor | WeightSource, shard_id: object = None
    ) -> None:
        n = param.shape[0]
        copy_into(param, read_narrow(src, 0, self.tp_rank * n, n), "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one matrix (e.g. gate | up)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes), bias)
        self.out_sizes = out_sizes

    def _load(
        self, param: nn.Parameter, src: torch.Tensor | WeightSource, shard_id: object = None
    ) -> None:
        assert isinstance(shard_id, int)
        size = self.out_sizes[shard_id] // self.tp_size
        offset = sum(self.out_sizes[:shard_id]) // self.tp_size
        loaded = read_narrow(src, 0, self.tp_rank * size, size)
        copy_into(param.data.narrow(0, offset, size), loaded, f"merged shard {shard_id}")


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

    def _load(
        self, param: nn.Parameter, src: torch.Tensor | WeightSource, shard_id: object = None
    ) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            dst, start = param.data.narrow(0, 0, q), self.tp_rank * q
        elif shard_id == "k":
            dst, start = param.data.narrow(0, q, kv), self.kv_head_start * self.head_dim
        else:
            assert shard_id == "v", shard_id
            dst, start = param.data.narrow(0, q + kv, kv), self.kv_head_start * self.head_dim
        copy_into(dst, read_narrow(src, 0, start, dst.shape[0]), f"qkv shard {shard_id}")


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split; the partial sums are all-reduced.

    `reduce_output` False: forward returns this rank's unreduced partial sum (no bias), for a
    consumer that sums it itself. Only a TP pass over the built model sets it, together with
    that consumer (engine.distributed.tp_pass: the all-reduce fused with the residual add and
    RMSNorm); model files always see the reduced output. Either way forward returns a tensor.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, reduce_output: bool = True
    ) -> None:
        super().__init__()
        tp = get_tp_group()
        assert in_features % tp.size == 0, f"{in_features} input features over TP {tp.size}"
        assert reduce_output or not bias, "an unreduced output cannot carry the bias"
        self.tp = tp
        self.reduce_output = reduce_output
        self.in_local = in_features // tp.size
        self.weight = _param(out_features, self.in_local)
        self.weight.weight_loader = self._load_weight  # type: ignore[attr-defined]
        self.bias = _param(out_features) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias  # type: ignore[attr-defined]

    def _load_weight(
        self, param: nn.Parameter, src: torch.Tensor | WeightSource, shard_id: object = None
    ) -> None:
        loaded = read_narrow(src, 1, self.tp.rank * self.in_local, self.in_local)
        copy_into(param, loaded, "row-parallel weight")

    def _load_bias(
        self, param: nn.Parameter, src: torch.Tensor | WeightSource, shard_id: object = None
    ) -> None:
        copy_into(param, read_all(src), "row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[T, out]: in x's dtype, or in float32 when the partial sums were reduced in float32
        (Reduction.fp32_max_rows); the consumer, the residual add, rounds it then, so that no
        separate cast runs (engine.layers.norm). Unreduced (`reduce_output` False): x's dtype."""
        if not self.reduce_output:
            return F.linear(x, self.weight)
        fp32 = (
            self.tp.size > 1
            and x.dtype != torch.float32
            and x.shape[0] <= self.tp.reduction.fp32_max_rows
        )
        partial = _linear_fp32_out(x, self.weight) if fp32 else F.linear(x, self.weight)
        y = self.tp.all_reduce(partial)
        return y if self.bias is None else y + self.bias


def _linear_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x W^T accumulated and returned in float32 (no rounding to x's dtype before the sum)."""
    if x.is_cuda:
        flat = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)
        return flat.view(*x.shape[:-1], -1)
    return F.linear(x.float(), weight.float())  # CPU has no mixed-dtype matmul: small models only
