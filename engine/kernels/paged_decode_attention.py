"""Paged decode attention, flash-decoding style: one new token per request over its paged context.

Grid `(batch, num_kv_heads, num_splits)`. Each program owns one KV head and every query head of
its GQA group (so the group shares one read of K/V), walks its split of the context in tiles of
`block_n` tokens gathered through the block table, and keeps an online softmax. With more than
one split a second kernel merges the partial results by log-sum-exp; with one split the first
kernel writes the output directly.

Hazards: block ids are widened to int64 before they are scaled by the block stride, since a
large cache holds more than 2^31 elements. `num_splits` changes the grid, so a CUDA graph must be
captured with a fixed `num_splits` (pass it explicitly).

FP8 caches: K and V tiles are widened to the query's dtype in registers (exact) and the layer's
scales are applied where they cost nothing: `k_scale` folds into the softmax scale (q . (k s) =
s (q . k)) and `v_scale` multiplies the output (sum p (v s) = s sum p v). The same numbers as
dequantizing every element (`stored * scale`), one multiply per row instead of per element.
"""

from __future__ import annotations

import math

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import (
    dot_precision,
    next_power_of_2,
    num_sms,
    upcast_dot,
)
from engine.kernels.extend_attention import check_kv_scales, check_paged_kv, extend_attention_ref

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    v_scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    q_ptrs = q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=h_mask[:, None], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    head_off = kv_head.to(tl.int64) * stride_kh
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        n_mask = pos < end
        block_ids = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        tok_off = block_ids * stride_kb + (pos % PAGE_SIZE) * stride_kt + head_off
        kv_offs = tok_off[:, None] + offs_d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=n_mask[:, None], other=0.0)
        k = k.to(q_ptr.dtype.element_ty)  # an FP8 cache widens (exactly); else a no-op
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offs, mask=n_mask[:, None], other=0.0)
        v = v.to(q_ptr.dtype.element_ty)
        p = p.to(q_ptr.dtype.element_ty)
        if UPCAST_DOT:
            v = v.to(tl.float32)
            p = p.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc * (v_scale / l_safe)[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        base = b.to(tl.int64) * stride_pb + split * stride_ps
        p_ptrs = part_out_ptr + base + heads[:, None] * stride_ph + offs_d[None, :]
        tl.store(p_ptrs, acc, mask=h_mask[:, None])
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))  # base 2
        l_ptrs = part_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split
        tl.store(l_ptrs, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    lse_ptrs = part_lse_ptr + b.to(tl.int64) * stride_lb + head * stride_lh + offs_s
    lse = tl.load(lse_ptrs, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len 0 (a padded row): out 0
    weights = tl.exp2(lse - lse_max)
    base = part_out_ptr + b.to(tl.int64) * stride_pb + head * stride_ph
    parts = tl.load(
        base + offs_s[:, None] * stride_ps + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, sm_count: int) -> int:
    """More splits when batch * kv_heads leaves SMs idle, fewer when the context is short.

    Aims at about three programs per SM (several fit at once), each with at least
    MIN_TOKENS_PER_SPLIT tokens so the merge stays cheap next to the KV read.
    """
    programs = batch * num_kv_heads
    wanted = triton.cdiv(3 * sm_count, programs)
    by_length = max(1, triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT))
    return max(1, min(wanted, by_length, MAX_SPLITS))


def _check_args(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    check_paged_kv(query, k_cache, v_cache, block_tables, seq_lens)
    batch = query.shape[0]
    if block_tables.shape[0] != batch or seq_lens.shape[0] != batch:
        raise ValueError(
            f"block_tables/seq_lens: batch {block_tables.shape[0]}/{seq_lens.shape[0]} != query batch {batch}"
        )


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of one query token per request over its paged context: returns [B, H, D].

    query [B, H, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D] (the query's dtype, or
    FP8 holding `real / k_scale` and `real / v_scale`; scales must be 1.0 otherwise);
    block_tables [B, max_blocks] int32; seq_lens [B] int32 (context including the new token,
    whose key must already be in the cache; a padded row with seq_len 0 gets zeros);
    max_seq_len >= max(seq_lens) (a host int, used only to pick the number of splits).
    Tuning knobs: num_splits, block_n, num_warps, num_stages.
    """
    _check_args(query, k_cache, v_cache, block_tables, seq_lens)
    check_kv_scales(k_cache, k_scale, v_scale)
    batch, num_heads, head_dim = query.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, num_sms(query.device))
    if num_splits < 1:
        raise ValueError(f"num_splits: must be >= 1, got {num_splits}")
    block_n = block_n or (64 if head_dim > 64 else 128)
    out = torch.empty_like(query)
    if batch == 0:
        return out
    part_out = query.new_empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32)
    part_lse = query.new_empty((batch, num_heads, num_splits), dtype=torch.float32)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * math.log2(math.e) * k_scale,
        float(v_scale),
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        NUM_SPLITS=num_splits,
        GROUP=group,
        BLOCK_H=max(16, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        DOT_PRECISION=dot_precision(query.dtype),
        UPCAST_DOT=upcast_dot(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            part_out.stride(0),
            part_out.stride(1),
            part_out.stride(2),
            part_lse.stride(0),
            part_lse.stride(1),
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            BLOCK_S=next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=4,
        )
    return out


def paged_decode_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Float32 reference (`paged_attention_ref`), one query row per request."""
    query_start_loc = torch.arange(query.shape[0] + 1, dtype=torch.int32, device=query.device)
    return extend_attention_ref(
        query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, k_scale, v_scale
    )
