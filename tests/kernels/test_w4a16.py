"""Weight-only quantized linear (4-bit W4A16 and 8-bit W8A16) against its torch reference:
decode (GEMV / split-K) and GEMM paths, every group size, ragged N and non-power-of-two K."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.w4a16 import (
    W4A16Config,
    choose_config,
    pack_int4,
    unpack_int4,
    w4a16_linear,
    w4a16_linear_ref,
)
from engine.kernels.w8a16 import w8a16_linear, w8a16_linear_ref
from tests.kernels.kernel_cases import DEVICE, DTYPES, TOLERANCES

# (M, N, K, group): M = 1 GEMV (split-K at K 2048), M 2..16 the 16-row decode dot, M > 16 GEMM
SHAPES = [
    (1, 96, 576, 32),
    (1, 64, 2048, 64),
    (3, 80, 576, 32),
    (16, 64, 2048, 128),
    (40, 96, 512, 128),
    (130, 160, 256, 32),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """kernel_cases' tolerances, the absolute one scaled by the output's largest magnitude: the
    GEMM feeds `tl.dot` weights rounded to x's dtype, so the error of a K-long sum grows with
    its scale. A wrong nibble, group or row errs by the order of the output itself."""
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol)


def _weights(
    n: int, k: int, group: int, bits: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random qweight / scales / mins (4-bit: asymmetric, as GGUF Q4_1 and AWQ store them)."""
    gen = torch.Generator().manual_seed(seed)
    step = 0.02 if bits == 4 else 0.002  # |w| below ~0.3 either way: outputs of order 1-10
    scales = (torch.rand(n, k // group, generator=gen) * step + 1e-3).to(dtype)
    if bits == 8:
        q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        return q.to(DEVICE), scales.to(DEVICE), None
    qweight = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    mins = (-8 * scales.float() * torch.rand(n, k // group, generator=gen)).to(dtype)
    return qweight.to(DEVICE), scales.to(DEVICE), mins.to(DEVICE)


def _x(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)


def _run(
    x: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    group: int,
    config: W4A16Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output, float32 reference on the same inputs)."""
    qweight, scales, mins = weights
    if mins is None:
        out = w8a16_linear(x, qweight, scales, group, config)
        return out, w8a16_linear_ref(x.float(), qweight, scales, group)
    out = w4a16_linear(x, qweight, scales, mins, group, config)
    return out, w4a16_linear_ref(x.float(), qweight, scales, mins, group)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group", SHAPES)
def test_matches_reference(
    bits: int, dtype: torch.dtype, m: int, n: int, k: int, group: int
) -> None:
    x = _x(m, k, dtype)
    out, ref = _run(x, _weights(n, k, group, bits, dtype), group)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    "config",
    [
        W4A16Config(1, 16, 32, 8),
        W4A16Config(1, 64, 64, 2),
        W4A16Config(16, 16, 32, 16),
        W4A16Config(32, 32, 256, 1),
    ],
    ids=str,
)
def test_every_config_computes_the_same(config: W4A16Config) -> None:
    """Tiles smaller and larger than the group, and splits down to one tile each."""
    x = _x(5, 512, torch.float32)
    out, ref = _run(x, _weights(48, 512, 64, 4, torch.float32), 64, config)
    assert_close(out, ref, torch.float32)


def test_gemv_path_uses_the_references_float32_arithmetic() -> None:
    x = _x(1, 1024, torch.float32)
    weights = _weights(64, 1024, 32, 4, torch.float32)
    out, ref = _run(x, weights, 32)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-6)


def test_configs_split_decode_and_tile_prefill() -> None:
    device = torch.device("cpu")
    assert choose_config(1, 4096, 4096, device).block_m == 1
    assert choose_config(8, 64, 4096, device).split_k > 1  # 1 N block: split K to fill the GPU
    assert choose_config(4096, 4096, 4096, device).split_k == 1
    assert choose_config(4096, 4096, 4096, device).block_m == 128


def test_pack_unpack_round_trip_and_nibble_order() -> None:
    q = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(q)), q.to(torch.int32))
    one = torch.zeros(1, 8, dtype=torch.int64)
    one[0, 7] = 15  # column 7 -> the top nibble of word 0: bits 28..31, a negative int32
    assert pack_int4(one).item() == -(2**28)


def test_rejects_bad_arguments() -> None:
    x = _x(2, 256, torch.float32)
    qweight, scales, mins = _weights(32, 256, 32, 4, torch.float32)
    assert mins is not None
    cases = {
        "group_size": lambda: w4a16_linear(x, qweight, scales, mins, 16),
        "qweight: 16 columns": lambda: w4a16_linear(
            x, qweight[:, :16].contiguous(), scales, mins, 32
        ),
        "qweight: dtype": lambda: w4a16_linear(x, qweight.long(), scales, mins, 32),
        "scales: shape": lambda: w4a16_linear(x, qweight, scales[:, :4].contiguous(), mins, 32),
        "mins: shape": lambda: w4a16_linear(x, qweight, scales, mins[:16], 32),
        "must be contiguous": lambda: w4a16_linear(
            x, qweight, scales.t().contiguous().t(), mins, 32
        ),
        "x: expected 2 dims": lambda: w4a16_linear(x[None], qweight, scales, mins, 32),
        "x: K 200": lambda: w4a16_linear(_x(2, 200, torch.float32), qweight, scales, mins, 32),
        "config.block_n": lambda: w4a16_linear(
            x, qweight, scales, mins, 32, W4A16Config(1, 24, 32)
        ),
        "split_k": lambda: w4a16_linear(x, qweight, scales, mins, 32, W4A16Config(1, 32, 64, 8)),
        "qweight: dtype torch.int32": lambda: w8a16_linear(x, qweight, scales, 32),
    }
    for match, call in cases.items():
        with pytest.raises(ValueError, match=match):
            call()


def test_empty_batch() -> None:
    qweight, scales, mins = _weights(32, 256, 32, 4, torch.float32)
    assert mins is not None
    assert w4a16_linear(_x(0, 256, torch.float32), qweight, scales, mins, 32).shape == (0, 32)


# Llama-3-8B's projections: qkv, o, gate_up, down
FULL_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 16, 512])
@pytest.mark.parametrize("n,k", FULL_SHAPES)
def test_full_shapes_gpu(bits: int, dtype: torch.dtype, m: int, n: int, k: int) -> None:
    out, ref = _run(_x(m, k, dtype), _weights(n, k, 128, bits, dtype), 128)
    assert_close(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_rows_beyond_int32_offsets_gpu(bits: int) -> None:
    """x [2^31 / 4096 + 16, 4096] and y [same, 4096] bf16 (~4.3 GB each): the last rows of both
    sit past element 2^31, so 32-bit row offsets would read and write the wrong memory."""
    m, n, k = 2**31 // 4096 + 16, 4096, 4096
    x = torch.empty(m, k, dtype=torch.bfloat16, device=DEVICE).normal_()
    weights = _weights(n, k, 32, bits, torch.bfloat16)
    qweight, scales, mins = weights
    out = (
        w8a16_linear(x, qweight, scales, 32)
        if mins is None
        else w4a16_linear(x, qweight, scales, mins, 32)
    )
    assert x.numel() > 2**31 and out.numel() > 2**31
    tail = slice(m - 8, m)
    _, ref = _run(x[tail].contiguous(), weights, 32)
    assert_close(out[tail], ref, torch.bfloat16)
