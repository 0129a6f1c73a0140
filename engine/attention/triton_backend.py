"""The Triton attention backend (CUDA): fused rope + KV store, paged decode and extend kernels.

Same contract and results (within rounding) as `TorchAttentionBackend`: `rope_and_store`
rotates q/k and writes k/v into the cache (kernel `rope_kv_store`); `attend` runs the
flash-decoding kernel when every request has exactly one new token, and the extend kernel
otherwise (it also serves the decode rows of mixed batches; short queries over long contexts
split their keys over several programs).

Hazard: the decode kernel picks its number of KV splits from `meta.max_seq_len` unless
`decode_num_splits` is fixed; a captured CUDA graph needs it fixed.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.kernels.extend_attention import ExtendConfig, extend_attention
from engine.kernels.paged_decode_attention import paged_decode_attention
from engine.kernels.rope_kv_store import rope_kv_store


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def __init__(self, decode_num_splits: int | None = None, extend_config: ExtendConfig | None = None) -> None:
        """Both knobs default to the kernels' own heuristics (see their launchers)."""
        self.decode_num_splits = decode_num_splits
        self.extend_config = extend_config

    def rope_and_store(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return rope_kv_store(query, key, value, positions, cos_sin_cache, meta.slot_mapping, k_cache, v_cache)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if meta.decode_only:
            return paged_decode_attention(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len,
                num_splits=self.decode_num_splits,
            )
        return extend_attention(
            query, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            meta.max_query_len, config=self.extend_config, max_seq_len=meta.max_seq_len,
        )
