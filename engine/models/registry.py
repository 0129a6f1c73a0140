"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from engine.config import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.errors import UnsupportedArchitectureError
from engine.models.llama import LlamaForCausalLM

_MODELS: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.architecture not in _MODELS:
        raise UnsupportedArchitectureError(cfg.architecture, list(_MODELS))
    return _MODELS[cfg.architecture]
