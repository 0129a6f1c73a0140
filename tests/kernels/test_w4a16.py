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
from engine.kernels.w4a16_gemv import GEMV_SWEEP, GemvConfig, choose_gemv_config
from engine.kernels.w8a16 import w8a16_linear, w8a16_linear_ref
from tests.kernels.kernel_cases import DEVICE, DTYPES, TOLERANCES

# (M, N, K, group) through the default dispatch: M <= 16 the decode path (M = 1 GEMV-like, else
# the 16-row dot), M > 16 GEMM (the GEMV of w4a16_gemv is tested below with its configs)
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
    config: W4A16Config | GemvConfig | None = None,
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
    out, ref = _run(x, weights, 32, choose_gemv_config(1, 64, 1024, 32, x.device))
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


# The decode GEMV (engine.kernels.w4a16_gemv): any M with a GemvConfig (the default for small
# M once GEMV_BY_DEFAULT is on); each test here passes its config.
GEMV_SHAPES = [(1, 37, 1024, 32), (2, 75, 2048, 64), (4, 50, 1024, 128), (1, 64, 576, 32)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group", GEMV_SHAPES)
def test_gemv_matches_reference(
    bits: int, dtype: torch.dtype, m: int, n: int, k: int, group: int
) -> None:
    """Odd N (a ragged last block), every group size, 1 to 4 rows, with the GEMV's own
    choice of config for the shape."""
    x = _x(m, k, dtype)
    config = choose_gemv_config(m, n, k, group, x.device)
    out, ref = _run(x, _weights(n, k, group, bits, dtype), group, config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    "config",
    [
        GemvConfig(1, 32, 1, 1, 1),  # K 1536 = 192 words: 6 steps of 32
        GemvConfig(2, 32, 4, 2, 2),  # 6 steps over 4 splits: 2, 2, 2, 0
        GemvConfig(16, 16, 2, 4, 3),  # 12 steps of 16
        GemvConfig(4, 64, 1, 4, 1),  # 3 steps of 512 columns, 8 groups each
        GemvConfig(8, 32, 2, 8, 4),
        GemvConfig(4, 64, 2, 4, 1),  # 3 steps over 2 splits: 2, 1
    ],
    ids=str,
)
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_every_config_computes_the_same(config: GemvConfig, bits: int) -> None:
    """Steps of one to several groups, one to sixteen rows, split-K down to one step each and
    uneven (an empty split included), a ragged N, on 2 rows (a GemvConfig forces the GEMV for
    any M)."""
    x = _x(2, 1536, torch.float32)
    out, ref = _run(x, _weights(29, 1536, 64, bits, torch.float32), 64, config)
    torch.testing.assert_close(out, ref, atol=4e-6, rtol=1e-5)


def test_gemv_with_split_k_is_deterministic() -> None:
    x = _x(1, 4096, torch.bfloat16)
    weights = _weights(24, 4096, 128, 4, torch.bfloat16)
    config = choose_gemv_config(1, 24, 4096, 128, x.device)
    assert config.split_k > 1  # 6 N blocks on the interpreter's 4 "SMs": K is split
    first, _ = _run(x, weights, 128, config)
    again, _ = _run(x, weights, 128, config)
    assert torch.equal(first, again)


def test_gemv_configs_fit_their_shapes() -> None:
    device = torch.device("cpu")
    for m, n, k, group in [(1, 4096, 4096, 128), (4, 28672, 4096, 32), (1, 64, 576, 32)]:
        config = choose_gemv_config(m, n, k, group, device)
        assert k % (config.block_kw * 8 * config.split_k) == 0
        assert config.block_kw * 8 >= group
    assert choose_gemv_config(1, 64, 576, 32, device).block_kw == 8  # 576 = 9 steps of 64
    default = choose_gemv_config(1, 4096, 4096, 128, device)
    assert default.block_n * default.block_kw * 4 >= 4096  # >= 4 KB of weights per step
    assert len(set(GEMV_SWEEP)) == len(GEMV_SWEEP) >= 30
    for sweep in GEMV_SWEEP:
        assert 1 <= sweep.block_n <= 16 and 16 <= sweep.block_kw <= 256
        assert 4096 % (sweep.block_kw * 8) == 0 and 14336 % (sweep.block_kw * 8) == 0


def test_gemv_rejects_bad_configs() -> None:
    x = _x(1, 256, torch.float32)
    qweight, scales, mins = _weights(32, 256, 64, 4, torch.float32)
    assert mins is not None
    cases = {
        "config.block_n": GemvConfig(block_n=3),
        "config.block_kw: 4 words": GemvConfig(block_kw=4),
        "config.block_kw: 64 x 8 columns must divide K 256": GemvConfig(block_kw=64),
        "config.num_warps": GemvConfig(num_warps=0),
    }
    for match, config in cases.items():
        with pytest.raises(ValueError, match=match):
            w4a16_linear(x, qweight, scales, mins, 64, config)


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


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gemv_weights_beyond_int32_offsets_gpu(bits: int) -> None:
    """The GEMV on weights of more than 2^31 elements (4-bit: 2^31 / 512 + 64 rows of K 4096,
    8.6 GB of words; 8-bit: 2^31 / 4096 + 64 rows): the last rows' words sit past element 2^31,
    so 32-bit row offsets would read the wrong memory."""
    k = 4096
    per_row = k // 8 if bits == 4 else k
    n = 2**31 // per_row + 64
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if bits == 4:
        qweight = torch.randint(-(2**31), 2**31, (n, per_row), dtype=torch.int32, device=DEVICE,
                                generator=gen)  # fmt: skip
    else:
        qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=DEVICE, generator=gen)
    scales = torch.rand(n, k // 32, device=DEVICE, generator=gen).mul_(0.02).to(torch.bfloat16)
    mins = None if bits == 8 else (-8 * scales.float()).to(torch.bfloat16)
    x = _x(1, k, torch.bfloat16)
    gemv = choose_gemv_config(1, n, k, 32, x.device)
    out = (
        w8a16_linear(x, qweight, scales, 32, gemv)
        if mins is None
        else w4a16_linear(x, qweight, scales, mins, 32, gemv)
    )
    assert qweight.numel() > 2**31
    tail = slice(n - 64, n)
    weights = (qweight[tail], scales[tail], None if mins is None else mins[tail])
    _, ref = _run(x, weights, 32)
    assert_close(out[:, tail], ref, torch.bfloat16)
