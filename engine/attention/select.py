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
    cache the backend cannot serve (naming `kv_cache_dtype`), an FP8 cache on a CUDA GPU
    without FP8 conversions (compute capability < 8.9) included.
    """
    backend = _construct(device, name, kv_spec)
    if kv_spec is not None:
        backend.check_kv_spec(kv_spec, model_dtype or kv_spec.kv_dtype)
        if kv_spec.is_scaled and device.type == "cuda":
            check_fp8_capability(kv_spec.kv_dtype, torch.cuda.get_device_capability(device))
    return backend


FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs that convert FP8 in hardware


def check_fp8_capability(kv_dtype: str, capability: tuple[int, int]) -> None:
    """Raises EngineConfigError naming kv_cache_dtype when a GPU of `capability` cannot hold a
    `kv_dtype` (FP8) cache: Triton has no FP8 conversions below compute capability 8.9."""
    if tuple(capability) < FP8_MIN_CAPABILITY:
        major, minor = capability
        raise EngineConfigError(
            f"kv_cache_dtype: {kv_dtype!r} needs a GPU with FP8 support (compute capability >= "
            f"8.9: Ada, Hopper or newer); this one is {major}.{minor}. Use kv_cache_dtype='auto'"
        )


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
