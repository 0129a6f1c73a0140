"""The plain torch attention backend: the reference every kernel is tested against.

Runs anywhere (CPU, and GPU as a fallback). Written for clarity, not speed: attention loops over
the requests of a step and gathers each one's context from its blocks.
"""

from __future__ import annotations

import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
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


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write new keys and values [T, Hkv, D] into their cache slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def gather_context(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` tokens of a request from its blocks: [seq_len, Hkv, D]."""
    num_blocks = cdiv(seq_len, cache.shape[1])
    blocks = cache.index_select(0, block_ids[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its paged context, in float32."""
    out = torch.empty_like(query)
    num_heads = query.shape[1]
    for b in range(meta.num_seqs):
        start, end = meta.query_start_loc_cpu[b], meta.query_start_loc_cpu[b + 1]
        seq_len = meta.seq_lens_cpu[b]
        k = gather_context(k_cache, meta.block_tables[b], seq_len).float()
        v = gather_context(v_cache, meta.block_tables[b], seq_len).float()
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
    """Serves any unscaled KV dtype: stores cast into the cache's dtype, attention is float32."""

    name = "torch"

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
    ) -> None:
        store_kv_ref(key, value, k_cache, v_cache, meta.slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        return paged_attention_ref(query, k_cache, v_cache, meta, scale)
