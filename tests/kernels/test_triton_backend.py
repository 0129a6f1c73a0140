"""TritonAttentionBackend against TorchAttentionBackend on whole layer steps: rope + store, then
attention, over mixed batches with random non-contiguous block tables."""

from __future__ import annotations

import pytest
import torch

from engine.attention.backend import AttentionBackend
from engine.attention.select import get_attention_backend
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend
from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec, LayerScales
from tests.kernels.kernel_cases import (
    DEVICE,
    DTYPES,
    FP8_DTYPES,
    FP8_SCALES,
    PagedBatch,
    assert_close,
    fp8_batch,
    make_paged_batch,
    rope_cache,
)

# (new tokens, context): decode rows, a prefix-hit prefill, a chunked-prefill row, a full prefill.
MIXED = ([1, 1, 24, 16, 33], [57, 2, 60, 48, 33])
DECODE = ([1, 1, 1], [1, 30, 77])


def _step(
    backend: AttentionBackend,
    batch: PagedBatch,
    new_kv: tuple[torch.Tensor, torch.Tensor],
    layer: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """One layer step on fresh copies of the caches; returns (rotated q, output, k_cache, v_cache)."""
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    cos_sin = rope_cache(max(256, int(batch.positions.max()) + 1), batch.query.shape[-1])
    q = backend.rope_and_store(
        batch.query, *new_kv, batch.positions, cos_sin, k_cache, v_cache, batch.meta, layer
    )
    out = backend.attend(q, k_cache, v_cache, batch.meta, batch.query.shape[-1] ** -0.5, layer)
    return q, out, k_cache, v_cache


def _compare(
    q_lens: list[int],
    seq_lens: list[int],
    dtype: torch.dtype,
    group: int,
    block_size: int,
    head_dim: int,
    backend: TritonAttentionBackend,
) -> None:
    num_kv_heads = 2 if group == 1 else 1
    batch = make_paged_batch(
        q_lens, seq_lens, group * num_kv_heads, num_kv_heads, head_dim, block_size, dtype
    )
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    kv_shape = (sum(q_lens), num_kv_heads, head_dim)
    new_k = torch.empty(kv_shape, dtype=dtype, device=DEVICE).normal_(generator=gen)
    new_kv = (new_k, torch.empty(kv_shape, dtype=dtype, device=DEVICE).normal_(generator=gen))
    ours = _step(backend, batch, new_kv)
    ref = _step(TorchAttentionBackend(), batch, new_kv)
    for actual, expected in zip(ours, ref):
        assert_close(actual, expected, dtype)
    assert not torch.equal(ours[2], batch.k_cache)  # the new keys really landed in the cache


@pytest.mark.parametrize(
    "dtype,group,block_size,head_dim",  # kernel tests cover the full cross; here one of each
    [(torch.float32, 1, 16, 64), (torch.float16, 4, 32, 64), (torch.bfloat16, 8, 16, 128)],
)
def test_mixed_batch_matches_torch_backend(
    dtype: torch.dtype, group: int, block_size: int, head_dim: int
) -> None:
    _compare(*MIXED, dtype, group, block_size, head_dim, TritonAttentionBackend())


@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_batch_matches_torch_backend(num_splits: int | None) -> None:
    _compare(
        *DECODE, torch.float16, 4, 16, 64, TritonAttentionBackend(decode_num_splits=num_splits)
    )


def test_select_picks_by_device_and_name() -> None:
    assert get_attention_backend(torch.device("cpu")).name == "torch"
    assert get_attention_backend(torch.device("cpu"), "torch").name == "torch"
    with pytest.raises(EngineConfigError, match="unknown backend 'flash'"):
        get_attention_backend(torch.device("cpu"), "flash")
    if torch.cuda.is_available():
        assert isinstance(get_attention_backend(torch.device("cuda")), TritonAttentionBackend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_shapes_gpu(dtype: torch.dtype) -> None:
    q_lens = [1] * 24 + [2048, 512, 1]
    seq_lens = [3000] * 24 + [2048, 4096, 1]
    _compare(q_lens, seq_lens, dtype, 4, 16, 128, TritonAttentionBackend())
    _compare([1] * 32, [4096] * 32, dtype, 4, 16, 128, TritonAttentionBackend())


@pytest.mark.parametrize("q_lens,seq_lens", [MIXED, DECODE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_layer_step_matches_torch_backend(
    q_lens: list[int], seq_lens: list[int], dtype: torch.dtype
) -> None:
    """Both backends over one FP8 spec: each reads its layer's scales (layer 1 here), the fused
    store quantizes as `quantize_kv` does, and attention over the result agrees."""
    scales = (LayerScales(1.0, 1.0), LayerScales(*FP8_SCALES))
    spec = KVCacheSpec(2, 1, 64, 16, "float8_e4m3fn", scales=scales)
    batch = fp8_batch(
        make_paged_batch(q_lens, seq_lens, 4, 1, 64, 16, dtype, seed=8), FP8_DTYPES[0]
    )
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    new_kv = tuple(
        torch.empty((sum(q_lens), 1, 64), dtype=dtype, device=DEVICE).normal_(generator=gen)
        for _ in range(2)
    )
    ours = _step(TritonAttentionBackend(kv_spec=spec), batch, new_kv, layer=1)  # type: ignore[arg-type]
    ref = _step(TorchAttentionBackend(spec), batch, new_kv, layer=1)  # type: ignore[arg-type]
    assert_close(ours[0], ref[0], dtype)
    for mine, theirs in zip(ours[2:], ref[2:]):  # within one FP8 step (bf16 rounding differs)
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=0.125, atol=2.0**-9)
    # attention over the very cache the Triton store wrote (on CPU a rotated bf16 key may be
    # one FP8 step off the reference's: the interpreter truncates when it narrows to bf16)
    scale = batch.query.shape[-1] ** -0.5
    expected = TorchAttentionBackend(spec).attend(ours[0], *ours[2:], batch.meta, scale, 1)
    assert_close(ours[1], expected, dtype)
    with pytest.raises(ValueError, match="layer"):
        _step(TorchAttentionBackend(spec), batch, new_kv)  # type: ignore[arg-type]
