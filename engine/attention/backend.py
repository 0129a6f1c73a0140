"""The attention backend seam: the torch reference (CPU, GPU fallback) and Triton (CUDA).

KV cache layout (the whole engine, kvtransfer and the kernels agree on it):

    kv_cache: Tensor[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]

(`engine.kv.spec.KVCacheSpec` describes it: geometry, the KV dtype, per-layer scales.)
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

from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec, LayerScales


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

    Per step, in this order (the runner and its CUDA graphs call the step hooks):
      1. `plan(meta)`, once, before the forward pass of an eager step; or `prepare_replay(meta)`,
         once, before a captured graph replays (never both, never inside a capture);
      2. in every layer, `rope_and_store` (by default `apply_rope` then `store_kv`; a backend may
         fuse them), then `attend`.
    `rope_and_store` applies rotary embeddings to the new queries and keys, writes the new keys
    and values into their slots, and returns the rotated queries. `attend` then reads only the
    cache (never the new k/v directly), so the same code serves prefill, chunked prefill,
    prefix hits and decode. Nothing mutates its inputs except the cache tensors.

    CUDA graphs: `capture_begin(meta)` and `capture_end(meta)` bracket the warm-up forward and
    the captured forward of one batch-size bucket, `meta` being that graph's static metadata.
    What the captured kernels read must stay valid for every replay.

    `kv_spec` (engine/kv/spec.py) describes the cache the backend serves (None for a backend
    built by hand, e.g. in kernel tests: the cache tensors then say all there is, and an FP8
    cache has scales of 1.0). A cache whose dtype needs per-layer scales (FP8) needs the layer
    index: `layer` in `rope_and_store` / `store_kv` / `attend` picks `kv_spec.scales[layer]`
    (`layer_scales`); stores write `value / scale` clamped to the format's range, reads use
    `stored * scale`. Unscaled caches ignore `layer`; a scaled one without it raises.
    """

    name: str = "abstract"

    def __init__(self, kv_spec: KVCacheSpec | None = None) -> None:
        self.kv_spec = kv_spec

    def check_kv_spec(self, spec: KVCacheSpec, model_dtype: str) -> None:
        """Raises EngineConfigError naming `kv_cache_dtype` unless this backend can store and
        read a cache of `spec` for a model computing in `model_dtype`. The default serves any
        unscaled dtype (stores cast into it, attention upcasts from it)."""
        if spec.is_scaled:
            raise EngineConfigError(
                f"kv_cache_dtype: {spec.kv_dtype!r} needs per-layer scales, which the {self.name} "
                f"attention backend does not support"
            )

    def layer_scales(self, layer: int | None) -> LayerScales:
        """Layer `layer`'s dequantization scales (1.0 when the cache is unscaled or there is no
        spec). Raises ValueError for a scaled spec and no layer: the wrong scales would
        silently corrupt the cache."""
        spec = self.kv_spec
        if spec is None or not spec.is_scaled:
            return LayerScales(1.0, 1.0)
        if layer is None or not 0 <= layer < spec.num_layers:
            raise ValueError(f"layer: a {spec.kv_dtype} cache needs a layer index, got {layer}")
        return spec.layer_scales(layer)

    def plan(self, meta: AttentionMetadata) -> None:
        """Per-step host work before an eager forward pass, e.g. split counts from the step's
        lengths; every layer of the step then reads what it set. Called exactly once per eager
        step, with the very `meta` the layers get. Default: nothing."""

    def capture_begin(self, meta: AttentionMetadata) -> None:
        """A CUDA graph over `meta` (static buffers; `max_seq_len` is the graph's bound) is about
        to be warmed up and captured: fix here whatever the captured launches depend on (grids,
        workspace buffers). Default: nothing."""

    def capture_end(self, meta: AttentionMetadata) -> None:
        """The graph over `meta` is captured: drop capture-only state. Default: nothing."""

    def prepare_replay(self, meta: AttentionMetadata) -> None:
        """Before a replay of the graph captured over `meta`'s device tensors, which now hold the
        step's inputs (rows past the real batch padded: null block, one token of context);
        the host fields are this step's, padded the same way. Device work enqueued here on the
        current stream runs before the replay. Must not change what the captured launches
        depend on. Default: nothing."""

    @abstractmethod
    def apply_rope(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim]
        key: torch.Tensor,  # [T, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [T] int64
        cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32: cos | sin halves
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotated queries and keys (new tensors, the inputs' dtype)."""

    @abstractmethod
    def store_kv(
        self,
        key: torch.Tensor,  # [T, num_kv_heads, head_dim], rotated
        value: torch.Tensor,  # [T, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        layer: int | None = None,
    ) -> None:
        """Writes the new keys and values into their slots (`meta.slot_mapping`, every slot >= 0:
        padding rows write the null block's slot 0), converted to the cache's dtype (quantized
        with layer `layer`'s scales for a scaled cache)."""

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
        layer: int | None = None,
    ) -> torch.Tensor:
        """Returns the rotated queries [T, num_heads, head_dim]: `apply_rope`, then `store_kv`
        of the rotated keys (backends with a fused kernel override this)."""
        query, key = self.apply_rope(query, key, positions, cos_sin_cache)
        self.store_kv(key, value, k_cache, v_cache, meta, layer)
        return query

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,  # [T, num_heads, head_dim], rotated
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        layer: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of the new queries over the cache: [T, num_heads, head_dim]
        (dequantized with layer `layer`'s scales for a scaled cache)."""
