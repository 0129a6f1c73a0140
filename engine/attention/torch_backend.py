"""The plain torch attention backend: the reference every kernel is tested against.

Runs anywhere (CPU, and GPU as a fallback). Written for clarity, not speed: attention loops over
the requests of a step and gathers each one's context from its blocks.

Scaled (FP8) caches: `quantize_kv` stores `value / scale` clamped to the format's largest finite
value and cast (round to nearest even); `dequantize_kv` reads `stored * scale` in float32.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.kv.spec import KVCacheSpec
from engine.utils.math import cdiv


def apply_rope_ref(
    x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.Tensor:
    """Rotate-half rotary embedding (the Llama / Hugging Face convention) on [T, H, D]."""
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache.index_select(0, positions)
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


FP8_KV_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """`x` as stored in a cache of `dtype`: FP8 gets `x / scale` (float32) clamped to the
    format's finite range, then cast; other dtypes a plain cast (`scale` must be 1.0)."""
    if dtype not in FP8_KV_DTYPES:
        assert scale == 1.0, f"scale {scale} for an unscaled {dtype} cache"
        return x.to(dtype)
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


def dequantize_kv(stored: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The real values of cache elements, in float32: `stored * scale`."""
    return stored.float() * scale if scale != 1.0 else stored.float()


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write new keys and values [T, Hkv, D] into their cache slots (`quantize_kv`)."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_new = quantize_kv(key, k_cache.dtype, k_scale)
    v_new = quantize_kv(value, v_cache.dtype, v_scale)
    _raw(k_cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _raw(k_new))
    _raw(v_cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, _raw(v_new))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """FP8 tensors as their bytes (torch's CPU index ops have no FP8 kernels); others as is."""
    return t.view(torch.uint8) if t.dtype in FP8_KV_DTYPES else t


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` tokens of a request from its blocks: [seq_len, Hkv, D]."""
    num_blocks = cdiv(seq_len, cache.shape[1])
    blocks = _raw(cache).index_select(0, block_ids[:num_blocks].long()).view(cache.dtype)
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its paged context, in float32
    (cache elements dequantized: `stored * k_scale` / `stored * v_scale`)."""
    out = torch.empty_like(query)
    num_heads = query.shape[1]
    for b in range(meta.num_seqs):
        start, end = meta.query_start_loc_cpu[b], meta.query_start_loc_cpu[b + 1]
        seq_len = meta.seq_lens_cpu[b]
        k = dequantize_kv(gather_context(k_cache, meta.block_tables[b], seq_len), k_scale)
        v = dequantize_kv(gather_context(v_cache, meta.block_tables[b], seq_len), v_scale)
        group = num_heads // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [S, H, D]
        v = v.repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [Q, H, D]
        scores = torch.einsum("qhd,shd->hqs", q, k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] > q_pos[:, None]
        scores.masked_fill_(mask[None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.einsum("hqs,shd->qhd", probs, v).to(query.dtype)
    return out


class TorchAttentionBackend(AttentionBackend):
    """Serves every KV dtype: stores cast (or quantize, FP8) into the cache's dtype, attention
    is float32 over the dequantized cache."""

    name = "torch"

    def check_kv_spec(self, spec: KVCacheSpec, model_dtype: str) -> None:
        """Any dtype of engine/kv/spec.py, scaled or not."""

    def apply_rope(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotate = apply_rope_ref
        return rotate(query, positions, cos_sin_cache), rotate(key, positions, cos_sin_cache)

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        layer: int | None = None,
    ) -> None:
        scales = self.layer_scales(layer)
        slots = meta.slot_mapping
        store_kv_ref(key, value, k_cache, v_cache, slots, scales.k_scale, scales.v_scale)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        layer: int | None = None,
    ) -> torch.Tensor:
        s = self.layer_scales(layer)
        return paged_attention_ref(query, k_cache, v_cache, meta, scale, s.k_scale, s.v_scale)
