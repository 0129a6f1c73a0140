"""Tensor parallelism's one cross-module optimisation, applied as a pass over the built model.

Layers shard themselves when they are built (engine/layers) and a row-parallel layer all-reduces
its own output, so a model is correct under TP exactly as its file is written. What a layer alone
cannot do is fuse its all-reduce into the next module: where a row-parallel output goes straight
into `norm(x + residual)` at a decoder-layer boundary, one kernel can sum the ranks' rows, add
the residual and normalise (engine.distributed.fused_norm; 4% of a TP 2 decode step on GPU).
`apply_fused_residual_norm` does that after the fact, as gpt-fast applies TP to an unchanged
model: it sets the linear's `reduce_output` to False and swaps the norm for
`FusedAllReduceRMSNorm`, which holds the same weight parameter (checkpoint names unchanged).

Why a pass rather than a type that travels from the linear to the norm: model files keep writing
`hidden, residual = norm(hidden, residual)`, and an MoE block's weighted sum or a parallel-
residual block's own adds need no knowledge of partial sums at all; the unfused path is correct
everywhere. The pass fuses only what it can see is safe: the sequential-residual decoder of
engine.models.llama, matched by exact type (a subclass may change the data flow: it stays
unfused, still correct). Sites, in execution order: layer i's `self_attn.o_proj` into its
`post_attention_layernorm`; its `mlp.down_proj` into layer i+1's `input_layernorm`, or the
model's final `norm` after the last layer.

Hazards:
- Slots: consecutive fused calls must alternate the kernel's two buffer slots, across steps too
  (a step's last call, then the next step's first). Sites get slot = index % 2 in execution
  order, and an even number of them is fused.
- Timing: run once the weights are loaded and before CUDA graphs are captured. Running it again
  changes nothing: a fused site no longer matches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.distributed.parallel_state import FusedNorm, TPGroup
from engine.layers.linear import RowParallelLinear
from engine.layers.norm import RMSNorm, add_rmsnorm
from engine.models.llama import MLP, Attention, DecoderLayer, LlamaModel


class FusedAllReduceRMSNorm(nn.Module):
    """`norm(sum + residual)` of a row-parallel layer's unreduced partial sum, where `sum` is
    that partial summed over the group: the fused op for the inputs it fits, else the group's
    all-reduce then add + RMSNorm. Returns (normed, new residual) as RMSNorm does."""

    def __init__(self, norm: RMSNorm, tp: TPGroup, op: FusedNorm, slot: int) -> None:
        super().__init__()
        self.weight = norm.weight  # the same Parameter: loading and state_dict names unchanged
        self.eps = norm.eps
        self.tp, self.op, self.slot = tp, op, slot

    def forward(
        self, partial: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.op.fits(partial):
            return self.op(partial, residual, self.weight, self.eps, self.slot)
        return add_rmsnorm(self.tp.all_reduce(partial), residual, self.weight, self.eps)


class FusionSite(NamedTuple):
    """A row-parallel layer whose output goes straight into `owner.<norm_name>(x, residual)`."""

    linear: RowParallelLinear
    owner: nn.Module
    norm_name: str


def apply_fused_residual_norm(model: nn.Module, tp: TPGroup) -> int:
    """Fuse the group's all-reduce into the norms that follow row-parallel layers, in place;
    returns the number of sites fused (0 when the group has no fused op: the model is
    untouched)."""
    op = tp.reduction.fused_norm
    if op is None:
        return 0
    sites = fusion_sites(model)
    sites = sites[: len(sites) - len(sites) % 2]  # even: the next step's first call alternates
    for index, site in enumerate(sites):
        norm = getattr(site.owner, site.norm_name)
        site.linear.reduce_output = False
        setattr(site.owner, site.norm_name, FusedAllReduceRMSNorm(norm, tp, op, index % 2))
    return len(sites)


def fusion_sites(model: nn.Module) -> list[FusionSite]:
    """The sites of `model` (a causal LM holding a LlamaModel as `.model`) in execution order."""
    decoder = getattr(model, "model", None)
    if type(decoder) is not LlamaModel:
        return []
    blocks = [_sequential_block(layer) for layer in decoder.layers]
    sites: list[FusionSite] = []
    for i, block in enumerate(blocks):
        if block is None:
            continue
        sites += _site(block.self_attn.o_proj, block, "post_attention_layernorm")
        mlp = block.mlp
        assert isinstance(mlp, MLP)  # _sequential_block checked its exact type
        if i + 1 == len(blocks):
            sites += _site(mlp.down_proj, decoder, "norm")
        elif (following := blocks[i + 1]) is not None:
            sites += _site(mlp.down_proj, following, "input_layernorm")
    return sites


def _sequential_block(layer: nn.Module) -> DecoderLayer | None:
    """`layer` if it is a decoder layer whose attention and MLP outputs are their row-parallel
    outputs (exact types: a subclass may change the data flow), else None."""
    if type(layer) is not DecoderLayer:
        return None
    plain = type(layer.self_attn) is Attention and type(layer.mlp) is MLP
    return layer if plain else None


def _site(linear: RowParallelLinear, owner: nn.Module, norm_name: str) -> list[FusionSite]:
    """[the site], or [] where the linear or the norm is not the plain kind."""
    norm = getattr(owner, norm_name, None)
    plain = (
        type(linear) is RowParallelLinear
        and linear.bias is None
        and linear.reduce_output
        and type(norm) is RMSNorm
    )
    return [FusionSite(linear, owner, norm_name)] if plain else []
