"""The attention backend seam: the torch reference (CPU, GPU fallback) and Triton (CUDA).

KV cache layout (the whole engine, kvtransfer and the kernels agree on it):

    kv_cache: Tensor[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

Layer `l` reads `k_cache = kv_cache[l, 0]` and `v_cache = kv_cache[l, 1]`, each
`[num_blocks, block_size, num_kv_heads, head_dim]` and contiguous. Token `i` of a request lives
in slot `block_ids[i // block_size] * block_size + i % block_size`. Element offsets can exceed
2^31 in a large cache: kernels compute them in int64.

A step is a flat varlen batch of T new tokens from B requests. Request b owns query rows
`query_start_loc[b] : query_start_loc[b + 1]`; its context after the step is `seq_lens[b]`
tokens (cached prefix + earlier chunks + these new tokens), and its new tokens sit at the end of
that context, so new token j of a request with q new tokens sees keys `0 .. seq_len - q + j`
(causal). Prefill, chunked prefill, prefix hits and decode are all this one shape.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step inputs of every attention layer, built once by the runner."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: context length after the step
    block_tables: torch.Tensor  # [B, max_blocks] int32, rows padded with 0
    max_query_len: int
    max_seq_len: int
    decode_only: bool  # every request has exactly one new token
    query_start_loc_cpu: tuple[int, ...]  # host copies for the reference path
    seq_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Computes attention for one layer over the paged cache.

    Contract: `rope_and_store` runs first in each layer; it applies rotary embeddings to the new
    queries and keys, writes the new keys and values into their slots, and returns the rotated
    queries. `attend` then reads only the cache (never the new k/v directly), so the same code
    serves prefill, chunked prefill, prefix hits and decode. Neither mutates its inputs except
    the cache tensors.
    """

    name: str = "abstract"

    @abstractmethod
    def rope_and_store(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32: cos | sin halves
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Returns the rotated queries [T, num_heads, head_dim]."""

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim], rotated
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Causal attention of the new queries over the cache: [T, num_heads, head_dim]."""
