"""The Triton attention backend (CUDA): fused rope + KV store, paged decode and extend kernels.

Same contract and results (within rounding) as `TorchAttentionBackend`: `rope_and_store`
rotates q/k and writes k/v into the cache in one kernel (`rope_kv_store`); `attend` runs the
flash-decoding kernel when every request has exactly one new token, and the extend kernel
otherwise (it also serves the decode rows of mixed batches; short queries over long contexts
split their keys over several programs). `apply_rope` and `store_kv` on their own (for a model
that rotates elsewhere) are the torch reference ops, inherited from `TorchAttentionBackend`:
correct everywhere, not tuned.

The kernels read the cache in the query's dtype, or FP8 (float8_e4m3fn / float8_e5m2) with the
layer's scales (`layer_scales(layer)`: the fused store quantizes, the attention kernels widen in
registers and fold the scales): this backend serves a KV cache in the model's dtype or FP8
(`check_kv_spec`; FP8 on CUDA also needs compute capability >= 8.9, checked in
engine/attention/select.py where the device is known).

`plan(meta)` picks the decode kernel's number of KV splits once per step (given a `kv_spec`);
without a plan for the very `meta` it is handed, `attend` lets the launcher pick per call.
Hazard: the split count changes the decode grid, so a captured CUDA graph must keep the one it
was captured with: `capture_begin` fixes it from the graph's bound `max_seq_len` (the same
choice the launcher makes from it), and replays never re-plan.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionMetadata
from engine.attention.torch_backend import TorchAttentionBackend
from engine.errors import EngineConfigError
from engine.kernels.checks import num_sms
from engine.kernels.extend_attention import ExtendConfig, extend_attention
from engine.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention
from engine.kernels.rope_kv_store import rope_kv_store
from engine.kv.spec import KVCacheSpec


class TritonAttentionBackend(TorchAttentionBackend):
    """The torch backend's `apply_rope` and `store_kv` (the reference ops), its own fused
    `rope_and_store` and attention kernels, and a narrower `check_kv_spec`."""

    name = "triton"

    def __init__(
        self,
        decode_num_splits: int | None = None,
        extend_config: ExtendConfig | None = None,
        kv_spec: KVCacheSpec | None = None,
    ) -> None:
        """Both knobs default to the kernels' own heuristics (see their launchers)."""
        super().__init__(kv_spec)
        self.decode_num_splits = decode_num_splits
        self.extend_config = extend_config
        self._planned: tuple[AttentionMetadata, int | None] | None = None  # (meta, decode splits)

    def check_kv_spec(self, spec: KVCacheSpec, model_dtype: str) -> None:
        if spec.kv_dtype != model_dtype and not spec.is_scaled:
            raise EngineConfigError(
                f"kv_cache_dtype: the triton attention kernels read the cache in the model's dtype "
                f"({model_dtype}) or FP8, not {spec.kv_dtype!r}; use kv_cache_dtype='auto', "
                f"'fp8' or attention_backend='torch'"
            )

    def plan(self, meta: AttentionMetadata) -> None:
        self._planned = (meta, self._decode_splits(meta)) if meta.decode_only else None

    def capture_begin(self, meta: AttentionMetadata) -> None:
        self.plan(meta)  # from the graph's bound max_seq_len: fixed for every replay

    def capture_end(self, meta: AttentionMetadata) -> None:
        self._planned = None

    def _decode_splits(self, meta: AttentionMetadata) -> int | None:
        """The decode kernel's split count for this step, None to let the launcher choose."""
        if self.decode_num_splits is not None or self.kv_spec is None:
            return self.decode_num_splits
        heads, device = self.kv_spec.num_local_heads, meta.seq_lens.device
        return choose_num_splits(meta.num_seqs, heads, meta.max_seq_len, num_sms(device))

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
        layer: int | None = None,
    ) -> torch.Tensor:
        s = self.layer_scales(layer)
        slots = meta.slot_mapping
        return rope_kv_store(
            query, key, value, positions, cos_sin_cache, slots, k_cache, v_cache, *s.as_tuple()
        )

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        layer: int | None = None,
    ) -> torch.Tensor:
        k_scale, v_scale = self.layer_scales(layer).as_tuple()
        if meta.decode_only:
            planned, splits = self._planned, self.decode_num_splits
            if planned is not None and planned[0] is meta:  # planned for this very step
                splits = planned[1]
            return paged_decode_attention(
                query,
                k_cache,
                v_cache,
                meta.block_tables,
                meta.seq_lens,
                scale,
                meta.max_seq_len,
                num_splits=splits,
                k_scale=k_scale,
                v_scale=v_scale,
            )
        return extend_attention(
            query,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            meta.max_query_len,
            config=self.extend_config,
            max_seq_len=meta.max_seq_len,
            k_scale=k_scale,
            v_scale=v_scale,
        )
