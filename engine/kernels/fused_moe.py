"""Fused mixture-of-experts MLP: y_t = sum_j w_tj * down_e(silu(gate_e(x_t)) * up_e(x_t)).

Stages (no host sync anywhere, so a CUDA graph captures the whole call):
1. `sort_by_expert` (torch ops): the T*k (token, choice) slots sorted by expert (stable), each
   expert's row range in that order, and a list of row blocks of BLOCK_M rows that never
   straddle two experts, padded to a size fixed by T alone (`max_blocks`); padding blocks carry
   expert id E and exit at once.
2. Grouped GEMM 1, one launch over every expert's row blocks: rows gather their token's x,
   multiply by the expert's [gate | up] rows ([E, 2I, H]), and SiLU-and-mul in float32 before
   one rounding: an [T*k, I] intermediate in sorted order.
3. Grouped GEMM 2, one launch: the intermediate times the expert's down rows ([E, H, I]),
   scaled by the slot's routing weight (float32), stored at the slot's own row of [T, k, H]
   (a scatter: every slot is written exactly once, so no atomics, and the result does not
   depend on scheduling).
4. The sum over the k choices (torch; float32 accumulation), back in token order.

Its torch reference is `engine.layers.moe.fused_experts_ref` (Triton-free, so CPU runs never
import Triton); tests/kernels/test_fused_moe.py checks one against the other. Rows and experts
are addressed with int64 offsets (E * 2I * H passes 2^31 in large models). Hazard: expert ids
must lie in [0, E); they are not checked (that would read them on the host).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from engine.kernels.checks import (
    check_same_device,
    check_tensor,
    dot_precision,
    num_sms,
    upcast_dot,
)

_ID_DTYPES = (torch.int32, torch.int64)


class MoETiles(NamedTuple):
    """Tile sizes of both grouped GEMMs (BLOCK_M rows of one expert per program)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


class ExpertSort(NamedTuple):
    """`sort_by_expert`'s output: int32 tensors on the ids' device."""

    sorted_slots: torch.Tensor  # [T*k]: slot t*k + j, ordered by expert (stable)
    block_expert: torch.Tensor  # [max_blocks]: each row block's expert; E = padding block
    block_row: torch.Tensor  # [max_blocks]: each row block's first row in sorted order
    expert_end: torch.Tensor  # [E]: one past each expert's last sorted row


def max_blocks(num_slots: int, num_experts: int, block_m: int) -> int:
    """Row blocks enough for any routing of `num_slots` slots: each expert holding rows wastes
    at most one partial block."""
    return triton.cdiv(num_slots, block_m) + min(num_experts, num_slots)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertSort:
    """The slots of topk_ids [T, k] grouped by expert into blocks of `block_m` rows (torch
    ops, no host sync; sizes depend on T, k, E and block_m only)."""
    flat = topk_ids.flatten().long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    ends = torch.cumsum(counts, 0)
    blocks = (counts + block_m - 1) // block_m
    block_ends = torch.cumsum(blocks, 0)
    block_ids = torch.arange(max_blocks(flat.numel(), num_experts, block_m), device=flat.device)
    block_expert = torch.searchsorted(block_ends, block_ids, right=True)
    expert = block_expert.clamp(max=num_experts - 1)
    first_block = block_ends[expert] - blocks[expert]
    block_row = ends[expert] - counts[expert] + (block_ids - first_block) * block_m
    return ExpertSort(
        order.to(torch.int32),
        block_expert.to(torch.int32),
        block_row.to(torch.int32),
        ends.to(torch.int32),
    )


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    out_ptr,
    sorted_slots_ptr,
    block_expert_ptr,
    block_row_ptr,
    expert_end_ptr,
    slot_weights_ptr,
    N,
    K,
    num_experts,
    top_k,
    stride_a,
    stride_we,
    stride_wn,
    stride_out,
    GATED: tl.constexpr,
    SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (row blocks, N blocks). GATED (GEMM 1): A rows are the slots' tokens, W is
    [E, 2N, K], out[row] = silu(a W[:N]^T) * (a W[N:]^T) in sorted order. SCATTER (GEMM 2): A
    rows are the sorted rows, W is [E, N, K], out[slot] = weight[slot] * a W^T."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    rows = tl.load(block_row_ptr + pid_m) + tl.arange(0, BLOCK_M)
    mask_m = rows < tl.load(expert_end_ptr + expert)
    slots = tl.load(sorted_slots_ptr + rows, mask=mask_m, other=0)
    if SCATTER:
        a_rows, out_rows = rows.to(tl.int64), slots.to(tl.int64)
    else:
        a_rows, out_rows = (slots // top_k).to(tl.int64), rows.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + expert.to(tl.int64) * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(
            a_ptr + a_rows[:, None] * stride_a + kk[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w_mask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_rows + kk[:, None], mask=w_mask, other=0.0)
        if UPCAST_DOT:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            w_up = tl.load(w_rows + N * stride_wn + kk[:, None], mask=w_mask, other=0.0)
            if UPCAST_DOT:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if SCATTER:
        acc *= tl.load(slot_weights_ptr + slots, mask=mask_m, other=0.0)[:, None]
    ptrs = out_ptr + out_rows[:, None] * stride_out + offs_n[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def choose_tiles(num_slots: int, num_experts: int, n: int, device: torch.device) -> MoETiles:
    """Rows per block from the mean rows per expert (decode: 16, the smallest `tl.dot`);
    columns narrowed while the grid would leave SMs idle."""
    rows_per_expert = num_slots / num_experts
    block_m = 16 if rows_per_expert <= 16 else 32 if rows_per_expert <= 48 else 64
    block_n = 128 if block_m == 64 else 64
    blocks = max_blocks(num_slots, num_experts, block_m)
    while block_n > 16 and blocks * triton.cdiv(n, block_n) < 2 * num_sms(device):
        block_n //= 2
    return MoETiles(block_m, block_n, 64)


def check_moe_args(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    """Ranks, dtypes, devices and the shapes the two GEMMs must agree on (ValueError)."""
    check_tensor("x", x, 2)
    check_tensor("w13", w13, 3, (x.dtype,))
    check_tensor("w2", w2, 3, (x.dtype,))
    check_tensor("topk_weights", topk_weights, 2, (torch.float32, x.dtype), contiguous=False)
    check_tensor("topk_ids", topk_ids, 2, _ID_DTYPES, contiguous=False)
    check_same_device(x=x, w13=w13, w2=w2, topk_weights=topk_weights, topk_ids=topk_ids)
    num_experts, two_inter, hidden = w13.shape
    if hidden != x.shape[1] or two_inter % 2:
        raise ValueError(f"w13: shape {tuple(w13.shape)} is not [E, 2*I, H={x.shape[1]}]")
    if tuple(w2.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"w2: shape {tuple(w2.shape)} != [E, H, I] = {(num_experts, hidden)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"topk_ids: shape {tuple(topk_ids.shape)} and topk_weights "
            f"{tuple(topk_weights.shape)} must both be [T={x.shape[0]}, k]"
        )
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"topk_ids: top-{topk_ids.shape[1]} of only {num_experts} experts")


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    sort: ExpertSort,
    weights: torch.Tensor,
    top_k: int,
    tiles: MoETiles,
    gated: bool,
) -> None:
    n = w.shape[1] // 2 if gated else w.shape[1]
    grid = (sort.block_expert.numel(), triton.cdiv(n, tiles.block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, sort.sorted_slots, sort.block_expert, sort.block_row, sort.expert_end,
        weights, n, w.shape[2], w.shape[0], top_k, a.stride(0), w.stride(0), w.stride(1),
        out.stride(0), GATED=gated, SCATTER=not gated, BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, UPCAST_DOT=upcast_dot(a.dtype),
        DOT_PRECISION=dot_precision(a.dtype), num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: MoETiles | None = None,
) -> torch.Tensor:
    """The MoE MLP of x [T, H] (see the module docstring); w13 [E, 2I, H] ([gate | up] rows),
    w2 [E, H, I], topk_weights [T, k] (float32 or x's dtype), topk_ids [T, k] int32/int64 in
    [0, E). Returns [T, H] in x's dtype. Transient memory: T*k*(I + H) elements of x's dtype."""
    check_moe_args(x, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[2]
    if num_tokens == 0:
        return torch.empty_like(x)
    num_slots = num_tokens * top_k
    # each GEMM narrows its own columns (N = I, then H); rows per block depend on T*k / E only
    up_tiles = tiles or choose_tiles(num_slots, num_experts, inter, x.device)
    down_tiles = tiles or choose_tiles(num_slots, num_experts, x.shape[1], x.device)
    assert up_tiles.block_m == down_tiles.block_m, "both GEMMs walk the same row blocks"
    sort = sort_by_expert(topk_ids, num_experts, up_tiles.block_m)
    weights = topk_weights.flatten().float()
    hidden = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    _launch(x, w13, hidden, sort, weights, top_k, up_tiles, gated=True)
    out = torch.empty(num_slots, x.shape[1], dtype=x.dtype, device=x.device)
    _launch(hidden, w2, out, sort, weights, top_k, down_tiles, gated=False)
    return out.view(num_tokens, top_k, -1).sum(dim=1)
