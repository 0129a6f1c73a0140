"""The fused MoE kernel against the torch reference (engine.layers.moe.fused_experts_ref):
uneven and empty experts, every block size, the expert sort on its own."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.fused_moe import MoETiles, fused_moe, sort_by_expert
from engine.layers.moe import fused_experts_ref, route
from tests.kernels.kernel_cases import DEVICE, DTYPES, assert_close


def _weights(
    num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w13 = torch.empty(num_experts, 2 * inter, hidden, device=DEVICE).normal_(generator=gen)
    w2 = torch.empty(num_experts, hidden, inter, device=DEVICE).normal_(generator=gen)
    return (w13 * hidden**-0.5).to(dtype), (w2 * inter**-0.5).to(dtype)


def _routed(
    num_tokens: int, num_experts: int, top_k: int, hidden: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.empty(num_tokens, hidden, device=DEVICE).normal_(generator=gen).to(dtype)
    logits = torch.empty(num_tokens, num_experts, device=DEVICE).normal_(generator=gen)
    weights, ids = route(logits, top_k, renormalize=True)
    return x, weights, ids


def _check(x, w13, w2, weights, ids, dtype, tiles: MoETiles | None = None) -> None:
    out = fused_moe(x, w13, w2, weights, ids, tiles)
    assert out.shape == x.shape and out.dtype == dtype
    ref = fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,hidden,inter",
    [
        (1, 8, 2, 64, 32),
        (7, 8, 2, 96, 48),
        (40, 16, 4, 64, 80),
        (3, 8, 2, 128, 64),
        (3, 128, 8, 64, 48),
    ],
)
def test_matches_reference(dtype, num_tokens, num_experts, top_k, hidden, inter) -> None:
    """Softmax-routed tokens: experts with 0, 1 and many rows; H and I off the tile sizes; 128
    experts for 24 slots (Qwen3-30B's top-8 routing: mostly padding blocks)."""
    x, weights, ids = _routed(num_tokens, num_experts, top_k, hidden, dtype)
    w13, w2 = _weights(num_experts, hidden, inter, dtype)
    _check(x, w13, w2, weights, ids, dtype)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_uneven_experts_every_block_size(block_m: int) -> None:
    """37 tokens, top-2 of 8: expert 5 takes every token's first choice (37 rows: several
    blocks, the last partial), expert 2 one token, experts 0, 1, 3, 4, 6, 7 the rest or none."""
    dtype, hidden, inter = torch.float32, 64, 48
    x, weights, _ = _routed(37, 8, 2, hidden, dtype)
    ids = torch.stack([torch.full((37,), 5), torch.arange(37) % 3 * 3 % 8], dim=1)
    ids[0, 1] = 2
    ids = ids.to(DEVICE)
    w13, w2 = _weights(8, hidden, inter, dtype)
    _check(x, w13, w2, weights, ids, dtype, MoETiles(block_m, 32, 32))


def test_all_tokens_to_one_expert_others_empty() -> None:
    dtype = torch.bfloat16
    x, weights, _ = _routed(20, 4, 1, 64, dtype)
    ids = torch.full((20, 1), 3, device=DEVICE)
    w13, w2 = _weights(4, 64, 32, dtype)
    _check(x, w13, w2, weights, ids, dtype)


def test_no_tokens() -> None:
    x, weights, ids = _routed(0, 8, 2, 64, torch.float32)
    w13, w2 = _weights(8, 64, 32, torch.float32)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, 64)


def test_sort_by_expert_blocks_cover_each_slot_once() -> None:
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]], device=DEVICE)
    sort = sort_by_expert(ids, num_experts=5, block_m=2)
    assert sort.sorted_slots.tolist() == [1, 4, 3, 7, 0, 2, 5, 6]  # experts 0 0 1 2 3 3 3 3
    assert sort.expert_end.tolist() == [2, 3, 4, 8, 8]
    # blocks: e0 [0, 2), e1 [2, 3), e2 [3, 4), e3 [4, 6) and [6, 8); then padding (expert 5)
    # up to cdiv(8, 2) + min(5, 8) = 9 blocks
    assert sort.block_expert.tolist() == [0, 1, 2, 3, 3, 5, 5, 5, 5]
    assert sort.block_row.tolist()[:5] == [0, 2, 3, 4, 6]


def test_rejects_bad_arguments() -> None:
    x, weights, ids = _routed(4, 8, 2, 64, torch.float32)
    w13, w2 = _weights(8, 64, 32, torch.float32)
    with pytest.raises(ValueError, match="w13"):
        fused_moe(x, w13[:, :, :32], w2, weights, ids)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, w2[:, :, :16], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(x, w13, w2, weights, ids[:, :1])
    with pytest.raises(ValueError, match="w13"):
        fused_moe(x, w13.half(), w2, weights, ids)


@pytest.mark.gpu
def test_qwen3_30b_layer_shape_gpu() -> None:
    """128 experts, top-8, H 2048, I 768, bf16, at decode and prefill batch sizes."""
    w13, w2 = _weights(128, 2048, 768, torch.bfloat16)
    for num_tokens in (1, 16, 256, 2048):
        x, weights, ids = _routed(num_tokens, 128, 8, 2048, torch.bfloat16)
        _check(x, w13, w2, weights, ids, torch.bfloat16)


@pytest.mark.gpu
def test_expert_offsets_beyond_int32_gpu() -> None:
    """w13 [20, 2 * 14336, 4096] bf16: 2.35e9 elements (~4.7 GB); every token routes to the
    last experts, whose rows lie past 2^31 elements."""
    num_experts, hidden, inter = 20, 4096, 14336
    w13 = torch.empty(num_experts, 2 * inter, hidden, dtype=torch.bfloat16, device=DEVICE)
    w13.normal_(std=hidden**-0.5)
    w2 = torch.empty(num_experts, hidden, inter, dtype=torch.bfloat16, device=DEVICE)
    w2.normal_(std=inter**-0.5)
    assert w13.numel() > 2**31
    x, weights, _ = _routed(8, num_experts, 2, hidden, torch.bfloat16)
    ids = torch.tensor([[19, 18]] * 8, device=DEVICE)
    out = fused_moe(x, w13, w2, weights, ids)
    ref = fused_experts_ref(x, w13, w2, weights, ids)  # bf16 on the GPU: the 4.7 GB stay put
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_cuda_graph_replays_new_routing_gpu() -> None:
    """No host sync inside: captured once, replayed after the routing changed in place."""
    dtype = torch.bfloat16
    x, weights, ids = _routed(16, 128, 8, 256, dtype)
    w13, w2 = _weights(128, 256, 64, dtype)
    fused_moe(x, w13, w2, weights, ids)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    logits = torch.randn(16, 128, device=DEVICE)
    new_weights, new_ids = route(logits, 8, renormalize=False)
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert_close(out, fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids), dtype)
