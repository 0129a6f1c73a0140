"""The quantized linear methods' math against float references (engine.quant.fp8 / int4), on CPU:
quantization error bounds, the storage layout, and each layer's product against the same
dequantized weights multiplied in float64."""

from __future__ import annotations

import pytest
import torch

from engine.errors import EngineConfigError, ModelLoadError
from engine.kernels.w4a16 import dequantize_int4, unpack_int4
from engine.layers.linear import ColumnParallelLinear, LinearBase, RowParallelLinear
from engine.quant import fp8 as fp8_mod
from engine.quant.fp8 import FP8, Fp8LinearMethod, quantize_rows
from engine.quant.int4 import Int4LinearMethod, layer_group_size, quantize_int4


def _weights(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0] = 0.0  # an all-zero row: a finite scale, exact zeros back
    w[1, :7] *= 40  # an outlier row
    return w


def _layer(method: Fp8LinearMethod | Int4LinearMethod, w: torch.Tensor) -> LinearBase:
    layer = ColumnParallelLinear(w.shape[1], w.shape[0])
    layer.set_method(method)
    slot = "qweight" if isinstance(method, Int4LinearMethod) else "weight"
    param = layer.slot(slot)
    param.weight_loader(param, w, None)  # type: ignore[attr-defined]
    return layer


def test_fp8_rows_round_trip_within_e4m3_precision():
    w = _weights(64, 256)
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (64,)
    back = q.float() * scale[:, None]
    assert torch.equal(back[0], torch.zeros(256))
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value, plus the subnormal floor
    bound = w.abs() * 2**-4 + scale[:, None] * 2**-9
    assert bool(((back - w).abs() <= bound + 1e-12).all())
    assert torch.allclose(q.float().abs().amax(-1)[1:], torch.full((63,), 448.0))


def test_fp8_layer_equals_dequantized_float64_product():
    w, bias = _weights(48, 128), torch.randn(48)
    layer = ColumnParallelLinear(128, 48, bias=True)
    layer.set_method(Fp8LinearMethod())
    layer.slot("weight").weight_loader(layer.slot("weight"), w, None)  # type: ignore[attr-defined]
    layer.slot("bias").weight_loader(layer.slot("bias"), bias, None)  # type: ignore[attr-defined]
    x = torch.randn(7, 128)
    y = layer(x)
    xq, xs = quantize_rows(x)
    wd = layer.slot("weight").double() * layer.slot("weight_scale").double()[:, None]
    expect = (xq.double() * xs.double()[:, None]) @ wd.t() + bias.double()
    torch.testing.assert_close(y.double(), expect, rtol=1e-5, atol=1e-5)
    assert (y - torch.nn.functional.linear(x, w, bias)).norm() / y.norm() < 0.05


def test_fp8_fp32_out_and_bfloat16_input():
    layer = _layer(Fp8LinearMethod(), _weights(32, 64))
    x = torch.randn(3, 64)
    assert layer.method.apply(layer, x.bfloat16(), None, fp32_out=True).dtype == torch.float32
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), layer(x.bfloat16().float()), rtol=1e-2, atol=1e-2)


def test_int4_layout_nibble_i_of_word_j_is_column_8j_plus_i():
    q = torch.arange(2 * 16).reshape(2, 16) % 16
    w = q.float() * 0.5 - 1.0  # each row spans 0..15 steps of 0.5 from -1: q comes back exactly
    packed, scales, mins = quantize_int4(w.repeat(1, 2), 32, torch.float32)
    words = packed[:, 0].tolist()
    for n in range(2):
        for i in range(8):
            assert (words[n] >> (4 * i)) & 0xF == q[n, i]
    assert torch.equal(unpack_int4(packed), q.repeat(1, 2).int())
    assert torch.allclose(scales, torch.full((2, 1), 0.5)) and torch.allclose(
        mins, -torch.ones(2, 1)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_error_within_half_a_step(dtype):
    w = _weights(16, 512)
    packed, scales, mins = quantize_int4(w, 128, dtype)
    assert packed.dtype == torch.int32 and packed.shape == (16, 64)
    assert scales.shape == mins.shape == (16, 4) and scales.dtype == dtype
    back = dequantize_int4(packed, scales, mins, 128)
    step = scales.float().repeat_interleave(128, dim=1)
    assert torch.equal(back[0], torch.zeros(512))
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())


def test_int4_layer_equals_dequantized_float64_product():
    w, x = _weights(40, 256), torch.randn(5, 256)
    layer = _layer(Int4LinearMethod(), w)
    assert layer.group_size == 128
    qweight, scales, mins = (layer.slot(n) for n in ("qweight", "scales", "mins"))
    expect = x.double() @ dequantize_int4(qweight, scales, mins, 128).double().t()
    torch.testing.assert_close(layer(x).double(), expect, rtol=1e-5, atol=1e-5)
    assert (layer(x) - x @ w.t()).norm() / (x @ w.t()).norm() < 0.15


def test_group_size_falls_back_where_128_does_not_divide():
    assert layer_group_size(576, 576, 128, 1) == 64  # SmolLM2's hidden size
    assert layer_group_size(14336, 14336 // 4, 128, 4) == 128  # Llama-3-8B down_proj, TP 4
    with pytest.raises(EngineConfigError, match="quantization: int4 group size 128 .* TP 4"):
        layer_group_size(256, 64, 128, 4)
    with pytest.raises(EngineConfigError, match="quantization"):
        layer_group_size(100, 100, 128, 1)


def test_row_parallel_int4_refuses_a_shard_that_cuts_groups():
    from engine.distributed import TPGroup, set_tp_group

    set_tp_group(TPGroup(rank=0, size=4))
    try:
        layer = RowParallelLinear(256, 64)  # 64 input columns a rank: half a group of 128
        with pytest.raises(EngineConfigError, match="^quantization: .*64 input features"):
            layer.set_method(Int4LinearMethod())
    finally:
        set_tp_group(TPGroup())


def test_methods_refuse_weights_of_the_wrong_kind():
    fp8_weights = _weights(16, 64).to(FP8)
    with pytest.raises(ModelLoadError, match="float8_e4m3fn, expected floating-point"):
        _layer(Fp8LinearMethod(), fp8_weights)  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="expected float8_e4m3fn"):
        _layer(Fp8LinearMethod(prequantized=True), _weights(16, 64))
    with pytest.raises(ModelLoadError, match="int4 quantizes float weights"):
        _layer(Int4LinearMethod(), fp8_weights)
    with pytest.raises(ModelLoadError, match=r"checkpoint shape \(16, 32\) != model shape"):
        layer = ColumnParallelLinear(64, 16)
        layer.slot("weight").weight_loader(layer.slot("weight"), _weights(16, 32), None)  # type: ignore[attr-defined]


def test_fp8_on_a_gpu_without_fp8_tensor_cores_names_quantization(monkeypatch):
    """The capability query is the hardware's interface; an A100's answer stands in for one."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(EngineConfigError, match=r"^quantization: 'fp8' needs FP8 .* 8\.0"):
        fp8_mod.check_fp8_device(torch.device("cuda"))
    fp8_mod.check_fp8_device(torch.device("cpu"))  # the reference path runs anywhere
