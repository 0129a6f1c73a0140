"""Phi-3 (transformers' `Phi3ForCausalLM`): the Llama decoder with a fused-tensor checkpoint.

The forward pass is Llama's: pre-norm sequential residual blocks, SiLU-gated MLP whose fused
projection is [gate | up], attention without bias (the residual dropouts are identities at
inference). What differs is the checkpoint: `self_attn.qkv_proj.weight` holds the [q | k | v]
rows and `mlp.gate_up_proj.weight` the [gate | up] rows, so the loader splits each into the
shards our QKVParallelLinear and MergedColumnParallelLinear load per TP rank
(engine.weights.FusedTensor). Rope variants this engine cannot reproduce (LongRoPE, partial
rotary) are rejected when the config is read (engine.config.ModelConfig.from_dict).
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.weights import FusedTensor


def fused_checkpoint_params(cfg: ModelConfig) -> dict[str, FusedTensor]:
    """Phi-3's fused checkpoint tensors: name fragment -> our parameter and its shards' rows."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        ".qkv_proj.": FusedTensor(".qkv_proj.", (("q", q_rows), ("k", kv_rows), ("v", kv_rows))),
        ".gate_up_proj.": FusedTensor(
            ".gate_up_proj.", ((0, cfg.intermediate_size), (1, cfg.intermediate_size))
        ),
    }


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's modules unchanged (so the TP pass fuses its blocks as it does Llama's); only the
    checkpoint's names differ: no per-projection tensors, two fused ones per layer."""

    stacked_params: dict[str, tuple[str, object]] = {}  # no q_proj, gate_proj, ... tensors

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg, max_positions)
        self.fused_params = fused_checkpoint_params(cfg)
