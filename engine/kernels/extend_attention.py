"""Extend (prefill) attention over the paged KV cache: varlen, causal, GQA.

Each request's new tokens attend to its whole context in the cache: cached prefix, earlier
chunks and themselves (`engine/attention/backend.py` states the layout). One kernel serves full
prefill, chunked prefill, prefix hits and decode rows inside mixed batches.

Grid `(query tiles, num_heads, batch)`: program `(t, h, b)` takes query tile t of request b (tiles
past the request's new tokens exit at once; the heaviest causal tiles run first) for head h.
It walks key tiles of `block_n` tokens, gathering each key row through the block table, with an
online softmax in float32 (`tl.dot`, float32 accumulation). Key tiles left of the tile's first
query position need no mask; only the tiles on the diagonal are masked; tiles wholly above the
diagonal are never visited.

Short queries over a long context (a prefix hit's uncached tail, a small last chunk) leave most
SMs idle: one program per head walks every key tile. There `num_splits > 1` splits each
program's unmasked key tiles over several programs (flash-decoding for extend): program
`(t, h, b * S + s)` walks split s of them (the last split also takes the diagonal tiles) and
writes its unnormalised partial output with its running max and sum; `_combine_kernel` merges
the splits. `choose_extend_splits` picks S from the SM count and the context length.

FP8 caches: tiles widen to the query's dtype in registers; `k_scale` folds into the softmax
scale and `v_scale` into the output (engine/kernels/paged_decode_attention.py says why).

Hazards: block ids are widened to int64 before they are scaled by the block stride (a large cache
holds more than 2^31 elements). The new keys must already be in the cache (`rope_and_store`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.attention.backend import AttentionMetadata
from engine.attention.torch_backend import FP8_KV_DTYPES, paged_attention_ref
from engine.kernels.checks import (
    check_paged_attention,
    check_same_device,
    check_tensor,
    dot_precision,
    next_power_of_2,
    num_sms,
    upcast_dot,
)


class ExtendConfig(NamedTuple):
    """Launch tuning knobs of the extend kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@triton.jit
def _attend_key_tile(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    n0,
    seq_len,
    bt_row,
    k_ptr,
    v_ptr,
    head_off,
    qk_scale,
    stride_kb,
    stride_kt,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    pos = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if MASKED:
        n_mask = pos < seq_len
        block_ids = tl.load(bt_row + pos // PAGE_SIZE, mask=n_mask, other=0)
    else:
        block_ids = tl.load(bt_row + pos // PAGE_SIZE)
    tok_off = block_ids.to(tl.int64) * stride_kb + (pos % PAGE_SIZE) * stride_kt + head_off
    kv_offs = tok_off[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptr + kv_offs, mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + kv_offs)
    k = k.to(COMPUTE_DTYPE)  # an FP8 cache widens (exactly); else a no-op
    if UPCAST_DOT:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptr + kv_offs, mask=n_mask[:, None], other=0.0)
    else:
        v = tl.load(v_ptr + kv_offs)
    v = v.to(COMPUTE_DTYPE)
    p = p.to(COMPUTE_DTYPE)
    if UPCAST_DOT:
        v = v.to(tl.float32)
        p = p.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    part_acc_ptr,
    part_ml_ptr,
    qk_scale,
    v_scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_btb,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ms,
    stride_mt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)
    q_pos = prefix + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_btb
    head_off = (head // GROUP).to(tl.int64) * stride_kh
    # Keys before the tile's first query position are visible to every row of the tile.
    full_end = ((prefix + tile * BLOCK_M) // BLOCK_N) * BLOCK_N
    diag_end = tl.minimum(seq_len, prefix + (tile + 1) * BLOCK_M)
    # This program's unmasked key tiles: split `split` of them; the last split takes the diagonal.
    num_full = full_end // BLOCK_N
    per_split = tl.cdiv(num_full, NUM_SPLITS)
    lo = tl.minimum(split * per_split, num_full) * BLOCK_N
    hi = tl.minimum((split + 1) * per_split, num_full) * BLOCK_N
    diag_lo = tl.where(split == NUM_SPLITS - 1, full_end, diag_end)
    for n0 in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(
            acc,
            m_i,
            l_i,
            q,
            q_pos,
            n0,
            seq_len,
            bt_row,
            k_ptr,
            v_ptr,
            head_off,
            qk_scale,
            stride_kb,
            stride_kt,
            HEAD_DIM,
            PAGE_SIZE,
            BLOCK_N,
            False,
            DOT_PRECISION,
            UPCAST_DOT,
            q_ptr.dtype.element_ty,
        )
    for n0 in range(diag_lo, diag_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_tile(
            acc,
            m_i,
            l_i,
            q,
            q_pos,
            n0,
            seq_len,
            bt_row,
            k_ptr,
            v_ptr,
            head_off,
            qk_scale,
            stride_kb,
            stride_kt,
            HEAD_DIM,
            PAGE_SIZE,
            BLOCK_N,
            True,
            DOT_PRECISION,
            UPCAST_DOT,
            q_ptr.dtype.element_ty,
        )

    if NUM_SPLITS == 1:
        acc = acc * (v_scale / l_i)[:, None]
        o_ptrs = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:  # partials: acc unnormalised, and the running max (log2 domain) and sum of each row
        p_ptrs = (
            part_acc_ptr
            + split * stride_ps
            + rows[:, None] * stride_pt
            + head * stride_ph
            + offs_d[None, :]
        )
        tl.store(p_ptrs, acc * v_scale, mask=m_mask[:, None])
        ml = part_ml_ptr + split * stride_ms + rows * stride_mt + head * 2
        tl.store(ml, m_i, mask=m_mask)
        tl.store(ml + 1, l_i, mask=m_mask)


@triton.jit
def _combine_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ms,
    stride_mt,
    stride_ot,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Program (t, h): merges the NUM_SPLITS partials of row t, head h (a split that saw no key
    has max -inf and sum 0, so it weighs nothing)."""
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    ml = part_ml_ptr + offs_s * stride_ms + row * stride_mt + head * 2
    m = tl.load(ml, mask=s_mask, other=float("-inf"))
    l_s = tl.load(ml + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    acc = tl.load(
        part_acc_ptr
        + offs_s[:, None] * stride_ps
        + row * stride_pt
        + head * stride_ph
        + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
    )
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    tl.store(
        out_ptr + row * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty)
    )


MIN_KEYS_PER_SPLIT = 512
MAX_EXTEND_SPLITS = 16
MAX_SPLIT_QUERY_LEN = 64  # longer query runs fill the GPU with query tiles already


def choose_extend_splits(
    max_query_len: int, max_seq_len: int, num_heads: int, batch: int, block_m: int, sm_count: int
) -> int:
    """Key splits for short queries over long contexts: about two programs per SM, each split
    with at least MIN_KEYS_PER_SPLIT keys; 1 (no split) otherwise."""
    if max_query_len > MAX_SPLIT_QUERY_LEN:
        return 1
    programs = triton.cdiv(max_query_len, block_m) * num_heads * batch
    wanted = triton.cdiv(2 * sm_count, programs)
    by_length = max(1, max_seq_len // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_EXTEND_SPLITS))


def default_config(
    head_dim: int, max_query_len: int, on_cuda: bool, dtype: torch.dtype = torch.bfloat16
) -> ExtendConfig:
    """Tile sizes by head dim and query length (Hopper-tuned defaults; bench/attention.py
    --sweep measures the alternatives). Short query runs (decode rows, small chunks) take a
    small BLOCK_M so a request's tile is not mostly padding. float32 (a correctness path, exact
    dots) takes modest tiles that compile fast. On the interpreter, few large tiles."""
    if not on_cuda:
        return ExtendConfig(64, 32, 4, 1)
    if dtype == torch.float32:
        return ExtendConfig(16 if max_query_len <= 16 else 64, 32, 4, 2)
    if max_query_len <= 16:
        return ExtendConfig(16, 64, 4, 2)
    if max_query_len <= 64:
        return ExtendConfig(64, 64, 4, 2)
    if head_dim <= 64:
        return ExtendConfig(128, 64, 4, 3)
    return ExtendConfig(128, 64, 8, 3)


def _check_args(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    check_paged_kv(query, k_cache, v_cache, block_tables, seq_lens)
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,))
    batch = seq_lens.shape[0]
    if query_start_loc.shape[0] != batch + 1 or block_tables.shape[0] != batch:
        raise ValueError(
            f"query_start_loc/block_tables: need {batch + 1}/{batch} rows for {batch} seq_lens, got "
            f"{query_start_loc.shape[0]}/{block_tables.shape[0]}"
        )


def check_paged_kv(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """`check_paged_attention`, letting the cache be FP8 (a query-dtype stand-in of the cache's
    shape takes the shared checks; the FP8 tensors get their own rank, dtype and device ones)."""
    if k_cache.dtype not in FP8_KV_DTYPES:
        check_paged_attention(query, k_cache, v_cache, block_tables, seq_lens)
        return
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, 4, FP8_KV_DTYPES)
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"v_cache: shape/dtype {tuple(v_cache.shape)}/{v_cache.dtype} differ from k_cache"
        )
    check_same_device(query=query, k_cache=k_cache, v_cache=v_cache)
    stand_in = torch.empty((1, 1, *k_cache.shape[2:]), dtype=query.dtype, device=query.device)
    check_paged_attention(query, stand_in, stand_in, block_tables, seq_lens)


def check_kv_scales(k_cache: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """Scales finite and > 0; exactly 1.0 for an unscaled cache (a scale there is a bug)."""
    if not all(math.isfinite(x) and x > 0 for x in (k_scale, v_scale)):
        raise ValueError(f"k_scale/v_scale: must be finite and > 0, got {k_scale}/{v_scale}")
    if k_cache.dtype not in FP8_KV_DTYPES and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(
            f"k_scale/v_scale: a {k_cache.dtype} cache is unscaled, got {k_scale}/{v_scale}"
        )


_PARTIALS: dict[tuple[torch.device, int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _partials(
    num_splits: int, num_tokens: int, num_heads: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split partials' buffers, reused from call to call (a forward pass makes one call per
    layer; allocating per call cost host time there). Hazard: safe because every call on a
    device is enqueued on one stream, so a call's writes follow the previous call's combine;
    launches on several streams at once would need their own buffers. 1 split: a stub."""
    key = (device, num_splits, num_tokens if num_splits > 1 else 0, num_heads, head_dim)
    buffers = _PARTIALS.get(key)
    if buffers is None:
        if len(_PARTIALS) >= 16:
            _PARTIALS.clear()
        if num_splits > 1:
            buffers = (
                torch.empty(
                    (num_splits, num_tokens, num_heads, head_dim),
                    dtype=torch.float32,
                    device=device,
                ),
                torch.empty(
                    (num_splits, num_tokens, num_heads, 2), dtype=torch.float32, device=device
                ),
            )
        else:  # unused by the kernel
            stub = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=device)
            buffers = (stub, stub)
        _PARTIALS[key] = buffers
    return buffers


def extend_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    config: ExtendConfig | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each request's new queries over its paged context: [T, H, D].

    query [T, H, D] (rotated); k_cache/v_cache [num_blocks, block_size, Hkv, D] holding every
    context token, the new ones included; block_tables [B, max_blocks] int32;
    query_start_loc [B + 1] int32; seq_lens [B] int32 with seq_lens[b] >= its new-token count;
    max_query_len >= every request's new-token count (a host int: it sizes the grid).
    `num_splits`: key splits per program (None: `choose_extend_splits` when `max_seq_len`, a
    host bound on seq_lens, is given; else 1). An FP8 cache holds `real / k_scale` and
    `real / v_scale` (scales must be 1.0 for other caches, which are in the query's dtype).
    """
    _check_args(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens)
    check_kv_scales(k_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = query.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    config = config or default_config(head_dim, max_query_len, query.is_cuda, query.dtype)
    out = torch.empty_like(query)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0 or max_query_len == 0:
        return out
    if num_splits is None:
        num_splits = (
            1
            if max_seq_len is None
            else choose_extend_splits(
                max_query_len, max_seq_len, num_heads, batch, config.block_m, num_sms(query.device)
            )
        )
    if num_splits < 1:
        raise ValueError(f"num_splits: must be >= 1, got {num_splits}")
    part_acc, part_ml = _partials(num_splits, num_tokens, num_heads, head_dim, query.device)
    grid = (triton.cdiv(max_query_len, config.block_m), num_heads, batch * num_splits)
    _extend_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        seq_lens,
        part_acc,
        part_ml,
        scale * math.log2(math.e) * k_scale,
        float(v_scale),
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        part_acc.stride(0),
        part_acc.stride(1),
        part_acc.stride(2),
        part_ml.stride(0),
        part_ml.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=page_size,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION=dot_precision(query.dtype),
        UPCAST_DOT=upcast_dot(query.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(num_tokens, num_heads)](
            part_acc,
            part_ml,
            out,
            part_acc.stride(0),
            part_acc.stride(1),
            part_acc.stride(2),
            part_ml.stride(0),
            part_ml.stride(1),
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_splits,
            SPLITS_P2=next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
        )
    return out


def reference_metadata(
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor
) -> AttentionMetadata:
    """AttentionMetadata for the torch reference from device tensors (syncs: tests only)."""
    starts = tuple(int(x) for x in query_start_loc.tolist())
    lens = tuple(int(x) for x in seq_lens.tolist())
    q_lens = [e - s for s, e in zip(starts, starts[1:])]
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64, device=seq_lens.device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        max_query_len=max(q_lens, default=0),
        max_seq_len=max(lens, default=0),
        decode_only=all(n == 1 for n in q_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lens,
    )


def extend_attention_ref(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Float32 reference: `paged_attention_ref` (output in query's dtype)."""
    meta = reference_metadata(block_tables, query_start_loc, seq_lens)
    return paged_attention_ref(query, k_cache, v_cache, meta, scale, k_scale, v_scale)
