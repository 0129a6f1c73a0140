"""Picks the attention backend for a device: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import os

import torch

from engine.attention.backend import AttentionBackend
from engine.errors import EngineConfigError

BACKEND_NAMES = ("torch", "triton")


def get_attention_backend(device: torch.device, name: str | None = None) -> AttentionBackend:
    """The backend called `name`, or the default for `device` when name is None.

    Raises EngineConfigError for an unknown name, or for "triton" on a device Triton cannot run
    on (CPU works only through the Triton interpreter, TRITON_INTERPRET=1, for tests).
    """
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpreted:
            raise EngineConfigError(f"attention_backend: 'triton' needs a CUDA device, got {device}")
        from engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise EngineConfigError(f"attention_backend: unknown backend {name!r}; choose one of {BACKEND_NAMES}")
