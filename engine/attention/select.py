"""Picks the attention backend for a device: Triton on CUDA, the torch reference elsewhere."""

from __future__ import annotations

import os

import torch

from engine.attention.backend import AttentionBackend
from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec

BACKEND_NAMES = ("torch", "triton")


def get_attention_backend(
    device: torch.device,
    name: str | None = None,
    kv_spec: KVCacheSpec | None = None,
    model_dtype: str | None = None,
) -> AttentionBackend:
    """The backend called `name`, or the default for `device` when name is None, serving a cache
    of `kv_spec` (when given) for a model computing in `model_dtype` (default: the KV dtype).

    Raises EngineConfigError for an unknown name, for "triton" on a device Triton cannot run
    on (CPU works only through the Triton interpreter, TRITON_INTERPRET=1, for tests), or for a
    cache the backend cannot serve (naming `kv_cache_dtype`).
    """
    backend = _construct(device, name, kv_spec)
    if kv_spec is not None:
        backend.check_kv_spec(kv_spec, model_dtype or kv_spec.kv_dtype)
    return backend


def _construct(
    device: torch.device, name: str | None, kv_spec: KVCacheSpec | None
) -> AttentionBackend:
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(kv_spec)
    if name == "triton":
        interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not interpreted:
            raise EngineConfigError(
                f"attention_backend: 'triton' needs a CUDA device, got {device}"
            )
        from engine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(kv_spec=kv_spec)
    raise EngineConfigError(
        f"attention_backend: unknown backend {name!r}; choose one of {BACKEND_NAMES}"
    )
