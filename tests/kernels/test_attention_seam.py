"""The attention seam's new parts: RoPE separable from the KV store (`apply_rope` + `store_kv`
equal the fused `rope_and_store`), and the Triton backend's per-step `plan` and CUDA-graph
capture hooks fixing the decode kernel's split count for exactly the metadata they were given."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from engine.attention import triton_backend
from engine.attention.backend import AttentionBackend
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend
from engine.kernels.checks import num_sms
from engine.kernels.paged_decode_attention import choose_num_splits
from engine.kv.spec import KVCacheSpec
from tests.kernels.kernel_cases import (
    DEVICE,
    PagedBatch,
    assert_close,
    make_paged_batch,
    rope_cache,
)

MIXED = ([1, 24, 16], [57, 60, 16])
DECODE = ([1, 1, 1], [300, 30, 700])
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 64, 16
SPEC = KVCacheSpec(1, KV_HEADS, HEAD_DIM, BLOCK, "float16")


def _batch(q_lens: list[int], seq_lens: list[int]) -> tuple[PagedBatch, torch.Tensor, torch.Tensor]:
    batch = make_paged_batch(q_lens, seq_lens, HEADS, KV_HEADS, HEAD_DIM, BLOCK, torch.float16)
    gen = torch.Generator(device=DEVICE).manual_seed(3)
    shape = (sum(q_lens), KV_HEADS, HEAD_DIM)
    new_k, new_v = (
        torch.empty(shape, dtype=torch.float16, device=DEVICE).normal_(generator=gen)
        for _ in range(2)
    )
    return batch, new_k, new_v


@pytest.mark.parametrize(
    "backend", [TorchAttentionBackend(), TritonAttentionBackend()], ids=["torch", "triton"]
)
def test_separate_rope_and_store_equal_the_fused_call(backend: AttentionBackend) -> None:
    batch, key, value = _batch(*MIXED)
    cos_sin = rope_cache(256, HEAD_DIM)
    fused_k, fused_v = batch.k_cache.clone(), batch.v_cache.clone()
    fused_q = backend.rope_and_store(
        batch.query, key, value, batch.positions, cos_sin, fused_k, fused_v, batch.meta
    )
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    q, k = backend.apply_rope(batch.query, key, batch.positions, cos_sin)
    backend.store_kv(k, value, k_cache, v_cache, batch.meta)
    for actual, expected in ((q, fused_q), (k_cache, fused_k), (v_cache, fused_v)):
        assert_close(actual, expected, torch.float16)
    assert not torch.equal(k_cache, batch.k_cache)


def _split_spy(monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """Records the `num_splits` every decode launch gets."""
    seen: list[int | None] = []
    real = triton_backend.paged_decode_attention

    def spy(*args: Any, num_splits: int | None = None, **kwargs: Any) -> torch.Tensor:
        seen.append(num_splits)
        return real(*args, num_splits=num_splits, **kwargs)

    monkeypatch.setattr(triton_backend, "paged_decode_attention", spy)
    return seen


def test_plan_fixes_the_split_count_for_its_own_step(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _split_spy(monkeypatch)
    batch, _, _ = _batch(*DECODE)
    backend = TritonAttentionBackend(kv_spec=SPEC)
    scale = HEAD_DIM**-0.5
    backend.plan(batch.meta)
    planned = backend.attend(batch.query, batch.k_cache, batch.v_cache, batch.meta, scale)
    expected = choose_num_splits(3, KV_HEADS, 700, num_sms(DEVICE))
    other_step = replace(batch.meta)  # equal values, another step: the plan does not apply
    unplanned = backend.attend(batch.query, batch.k_cache, batch.v_cache, other_step, scale)
    assert seen == [expected, None]
    assert torch.equal(planned, unplanned)  # the launcher picks the same count from the same meta
    reference = TorchAttentionBackend().attend(
        batch.query, batch.k_cache, batch.v_cache, batch.meta, scale
    )
    assert_close(planned, reference, torch.float16)


def test_capture_hooks_pin_splits_only_while_capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _split_spy(monkeypatch)
    batch, _, _ = _batch(*DECODE)
    graph_meta = replace(batch.meta, max_seq_len=4096)  # a graph's bound, not the step's length
    backend = TritonAttentionBackend(kv_spec=SPEC)
    backend.capture_begin(graph_meta)
    backend.attend(batch.query, batch.k_cache, batch.v_cache, graph_meta, 1.0)
    backend.capture_end(graph_meta)
    backend.prepare_replay(graph_meta)  # a no-op: the grid is the captured one
    backend.attend(batch.query, batch.k_cache, batch.v_cache, graph_meta, 1.0)
    assert seen == [choose_num_splits(3, KV_HEADS, 4096, num_sms(DEVICE)), None]


def test_fixed_splits_and_no_spec_keep_the_old_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _split_spy(monkeypatch)
    batch, _, _ = _batch(*DECODE)
    fixed = TritonAttentionBackend(decode_num_splits=3, kv_spec=SPEC)
    for backend in (fixed, TritonAttentionBackend()):
        backend.plan(batch.meta)
        backend.attend(batch.query, batch.k_cache, batch.v_cache, batch.meta, 1.0)
    assert seen == [3, None]
