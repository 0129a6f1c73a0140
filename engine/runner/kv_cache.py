"""Sizing and allocating the paged KV cache: measured free memory on GPU, a byte budget on CPU."""

from __future__ import annotations

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineConfigError

_SLACK_BYTES = 512 * 2**20


def block_bytes(cfg: ModelConfig, num_kv_heads_local: int, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.tensor([], dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * num_kv_heads_local * cfg.head_dim * itemsize


def activation_reserve(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype) -> int:
    """Upper estimate of the forward pass's transient memory at the largest step."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    per_token = (8 * cfg.hidden_size + 3 * cfg.intermediate_size + 2 * qkv) * itemsize
    logits = engine.max_num_seqs * cfg.vocab_size * 4 * 4
    return engine.max_num_batched_tokens * per_token + logits + _SLACK_BYTES


def num_kv_blocks(
    cfg: ModelConfig, engine: EngineConfig, device: torch.device, bytes_per_block: int, dtype: torch.dtype
) -> int:
    """Blocks (including the reserved null block 0) that fit the budget."""
    if engine.num_kv_blocks is not None:
        return engine.num_kv_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * engine.gpu_memory_utilization) - (total - free)
        budget -= activation_reserve(cfg, engine, dtype)
    else:
        budget = engine.kv_cache_bytes
    blocks = budget // bytes_per_block
    if blocks < 2:
        raise EngineConfigError(
            f"gpu_memory_utilization / kv_cache_bytes: no room for the KV cache "
            f"({budget / 2**20:.0f} MiB left, a block needs {bytes_per_block / 2**20:.2f} MiB)"
        )
    return int(blocks)


def allocate_kv_cache(
    cfg: ModelConfig, num_kv_heads_local: int, num_blocks: int, block_size: int,
    dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    shape = (cfg.num_layers, 2, num_blocks, block_size, num_kv_heads_local, cfg.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)
