"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (qkv bias, a gated shared expert) and
Qwen3-MoE (q/k RMSNorm).

The Llama decoder (engine.models.llama) built with MoEDecoderLayer: Llama's attention and
norms, the MLP a SparseMoeBlock (engine.layers.moe). The rest is the checkpoints' names: each
expert's projections are separate tensors
(`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`, ...)
that load into the layer's stacked expert weights as shard (e, 0 | 1) of `gate_up_proj` or
shard e of `down_proj`.
"""

from __future__ import annotations

from engine.config import ModelConfig
from engine.layers.moe import SparseMoeBlock
from engine.models.llama import DecoderLayer, LlamaForCausalLM
from engine.weights import dense_checkpoint_shapes

# checkpoint projection names -> (our stacked parameter, shard half or None for down)
_EXPERT_NAMES = {
    "MixtralForCausalLM": (".block_sparse_moe.experts.", {"w1": 0, "w3": 1, "w2": None}),
    "Qwen2MoeForCausalLM": (".mlp.experts.", {"gate_proj": 0, "up_proj": 1, "down_proj": None}),
    "Qwen3MoeForCausalLM": (".mlp.experts.", {"gate_proj": 0, "up_proj": 1, "down_proj": None}),
}


def expert_stacked_params(cfg: ModelConfig) -> dict[str, tuple[str, object]]:
    """Checkpoint name fragment -> (our parameter name fragment, shard id) for every expert's
    tensors of `cfg`'s architecture (and Mixtral's router, `block_sparse_moe.gate`). Matched
    before the dense entries, whose `.gate_proj.` / `.up_proj.` would also match them."""
    assert cfg.moe is not None, "an MoE architecture has ModelConfig.moe"
    prefix, names = _EXPERT_NAMES[cfg.architecture]
    params: dict[str, tuple[str, object]] = {}
    for expert in range(cfg.moe.num_experts):
        for name, half in names.items():
            fragment = f"{prefix}{expert}.{name}.weight"
            if half is None:
                params[fragment] = (".mlp.experts.down_proj", expert)
            else:
                params[fragment] = (".mlp.experts.gate_up_proj", (expert, half))
    if cfg.architecture == "MixtralForCausalLM":
        params[".block_sparse_moe.gate.weight"] = (".mlp.gate.weight", None)
    return params


def moe_checkpoint_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The Hugging Face tensor names and shapes of an MoE checkpoint of `cfg`: the dense ones
    (engine.weights.checkpoint_shapes) with each layer's MLP replaced by its router, experts
    and, for Qwen2-MoE, the shared expert and its gate. What random ("dummy") weights fill."""
    moe = cfg.moe
    assert moe is not None, "an MoE architecture has ModelConfig.moe"
    shapes = {k: v for k, v in dense_checkpoint_shapes(cfg).items() if ".mlp." not in k}
    h, inter, shared = cfg.hidden_size, moe.intermediate_size, moe.shared_expert_intermediate_size
    prefix, names = _EXPERT_NAMES[cfg.architecture]
    router = ".block_sparse_moe.gate.weight" if prefix.startswith(".block") else ".mlp.gate.weight"
    for i in range(cfg.num_layers):
        layer = f"model.layers.{i}"
        shapes[layer + router] = (moe.num_experts, h)
        for expert in range(moe.num_experts):
            for name, half in names.items():
                shape = (h, inter) if half is None else (inter, h)
                shapes[f"{layer}{prefix}{expert}.{name}.weight"] = shape
        if shared:
            shapes[f"{layer}.mlp.shared_expert.gate_proj.weight"] = (shared, h)
            shapes[f"{layer}.mlp.shared_expert.up_proj.weight"] = (shared, h)
            shapes[f"{layer}.mlp.shared_expert.down_proj.weight"] = (h, shared)
            shapes[f"{layer}.mlp.shared_expert_gate.weight"] = (1, h)
    return shapes


class MoEDecoderLayer(DecoderLayer):
    """Llama's pre-norm block with a sparse MLP. A subclass, so TP's fusion pass, which matches
    `type(layer) is DecoderLayer` exactly, leaves it alone."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, SparseMoeBlock(cfg))


class MoEForCausalLM(LlamaForCausalLM):
    """Serves MixtralForCausalLM, Qwen2MoeForCausalLM and Qwen3MoeForCausalLM: Llama's modules
    with sparse MLPs; only the layers and the checkpoint's expert names are its own."""

    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__(cfg, max_positions, MoEDecoderLayer)
        self.stacked_params = {**expert_stacked_params(cfg), **LlamaForCausalLM.stacked_params}
