"""The paged KV cache: its spec from the configs, sizing (measured free memory on GPU, a byte
budget on CPU) and allocation. Every byte count comes from the KVCacheSpec, never from the
model's dtype (the cache may be stored in another one)."""

from __future__ import annotations

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec

_SLACK_BYTES = 512 * 2**20


def kv_cache_spec(cfg: ModelConfig, engine: EngineConfig, tp_size: int) -> KVCacheSpec:
    """The cache one rank of a `tp_size` group allocates for this model and engine."""
    return KVCacheSpec(
        num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        block_size=engine.block_size,
        kv_dtype=engine.resolved_kv_cache_dtype(cfg.torch_dtype),
        tp_size=tp_size,
    )


def kv_torch_dtype(spec: KVCacheSpec) -> torch.dtype:
    """The torch dtype the spec's cache is stored in."""
    dtype = getattr(torch, spec.kv_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise EngineConfigError(f"kv_cache_dtype: this torch build has no {spec.kv_dtype!r}")
    return dtype


def activation_reserve(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Upper estimate of the forward pass's transient memory at the largest step (`dtype`: the
    model's, in which activations are computed)."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = (8 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * qkv) * itemsize
    logits = engine.max_num_seqs * cfg.vocab_size * 4 * 4
    return engine.max_num_batched_tokens * per_token + logits + _SLACK_BYTES


def num_kv_blocks(
    cfg: ModelConfig,
    engine: EngineConfig,
    device: torch.device,
    spec: KVCacheSpec,
    model_dtype: torch.dtype,
) -> int:
    """Blocks (the reserved null block 0 included) of `spec.bytes_per_block()` in the budget."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * engine.gpu_memory_utilization) - (total - free)
        budget -= activation_reserve(cfg, engine, model_dtype)
    else:
        budget = engine.kv_cache_bytes
    bytes_per_block = spec.bytes_per_block()
    blocks = budget // bytes_per_block
    if blocks < 2:
        raise EngineConfigError(
            f"gpu_memory_utilization / kv_cache_bytes: no room for the KV cache "
            f"({budget / 2**20:.0f} MiB left, a block needs {bytes_per_block / 2**20:.2f} MiB)"
        )
    return int(blocks)


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, device: torch.device) -> torch.Tensor:
    """A zeroed cache of `spec.cache_shape(num_blocks)` in the spec's dtype."""
    return torch.zeros(spec.cache_shape(num_blocks), dtype=kv_torch_dtype(spec), device=device)
