"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.errors import UnsupportedArchitectureError
from engine.models.llama import LlamaForCausalLM
from engine.models.moe import MoEForCausalLM
from engine.models.phi3 import Phi3ForCausalLM

# Llama, Mistral and the Qwens differ only by ModelConfig flags: one class serves them all
_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    # Llama with sparse MLPs (engine.layers.moe) and per-expert checkpoint tensors
    "MixtralForCausalLM": MoEForCausalLM,
    "Qwen2MoeForCausalLM": MoEForCausalLM,
    "Qwen3MoeForCausalLM": MoEForCausalLM,
}
assert set(_MODELS) == set(SUPPORTED_ARCHITECTURES), "config and registry disagree"


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.architecture not in _MODELS:
        raise UnsupportedArchitectureError(cfg.architecture, list(_MODELS))
    return _MODELS[cfg.architecture]
