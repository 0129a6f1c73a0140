"""Shared builders and tolerances for the kernel tests.

Tolerances (atol, rtol), kernel output (in its dtype) against a float32 reference computed on
the same inputs: float32 1e-5 (exact dot products), float16 2e-3 (~2 ulp at 1.0; attention
probabilities are rounded to fp16 before the PV product), bfloat16 1.6e-2 (2 ulp at 1.0; on
CPU the interpreter also truncates instead of rounding to nearest when narrowing to bf16).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionMetadata
from engine.utils.math import cdiv

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


@dataclass(frozen=True)
class PagedBatch:
    """A varlen step over a paged cache with random, non-contiguous block ids (0 unused)."""

    query: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    positions: torch.Tensor  # [T] int64
    block_ids: list[list[int]]


def make_paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: torch.device = DEVICE,
    spare_blocks: int = 5,
    first_block_id: int = 1,
) -> PagedBatch:
    """Random q and caches; request b's context (seq_lens[b] tokens) lies in its blocks, its
    q_lens[b] new tokens at the end. Block ids are drawn from
    [first_block_id, first_block_id + needed + spare) in random order."""
    gen = torch.Generator().manual_seed(seed)
    needed = [cdiv(s, block_size) for s in seq_lens]
    ids = (torch.randperm(sum(needed) + spare_blocks, generator=gen) + first_block_id).tolist()
    gen = torch.Generator(device=device).manual_seed(seed)
    block_ids = [ids[sum(needed[:b]) : sum(needed[: b + 1])] for b in range(len(seq_lens))]
    num_blocks = first_block_id + sum(needed) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.empty(shape, dtype=dtype, device=device).normal_(generator=gen)
    v_cache = torch.empty(shape, dtype=dtype, device=device).normal_(generator=gen)
    query = torch.empty(sum(q_lens), num_heads, head_dim, dtype=dtype, device=device).normal_(
        generator=gen
    )
    meta = make_metadata(q_lens, seq_lens, block_ids, block_size, device)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).to(device)
    return PagedBatch(query, k_cache, v_cache, meta, positions, block_ids)


def make_metadata(
    q_lens: list[int],
    seq_lens: list[int],
    block_ids: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    width = max(len(ids) for ids in block_ids) + 1  # one padding column, as the runner pads
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    for b, ids in enumerate(block_ids):
        table[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    slots = [
        block_ids[b][pos // block_size] * block_size + pos % block_size
        for b, (q, s) in enumerate(zip(q_lens, seq_lens))
        for pos in range(s - q, s)
    ]
    starts = tuple(itertools.accumulate(q_lens, initial=0))
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        decode_only=all(q == 1 for q in q_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=tuple(seq_lens),
    )


def rope_cache(
    max_positions: int, head_dim: int, device: torch.device = DEVICE, base: float = 10000.0
) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos | sin halves (rotate-half convention)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SCALES = (0.02, 0.5)  # (k_scale, v_scale): unequal, and k's puts N(0, 1) keys near 50


def fp8_batch(
    batch: PagedBatch, kv_dtype: torch.dtype, scales: tuple[float, float] = FP8_SCALES
) -> PagedBatch:
    """`batch` with its caches quantized into `kv_dtype` (`quantize_kv`, the store's rule)."""
    from engine.attention.torch_backend import quantize_kv

    k_scale, v_scale = scales
    k_cache = quantize_kv(batch.k_cache, kv_dtype, k_scale)
    v_cache = quantize_kv(batch.v_cache, kv_dtype, v_scale)
    return PagedBatch(batch.query, k_cache, v_cache, batch.meta, batch.positions, batch.block_ids)
