"""The quantized methods' CUDA paths (bench/gpu_quant.sh runs these on the GPU host): FP8 through
`torch._scaled_mm` equals the float32 reference to bf16 rounding, int4 through the W4A16 Triton
kernel equals its torch reference, and an FP8 / int4 tiny model serves through `LLM` with CUDA
graphs. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear import ColumnParallelLinear, LinearBase
from engine.quant.fp8 import Fp8LinearMethod, fp8_linear_ref
from engine.quant.int4 import Int4LinearMethod
from tests.engine.test_quant_loading import build_float, build_fp8

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _layer(method: Fp8LinearMethod | Int4LinearMethod, n: int, k: int) -> LinearBase:
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            layer = ColumnParallelLinear(k, n)
            layer.set_method(method)
        finally:
            torch.set_default_dtype(torch.float32)
    slot = "qweight" if isinstance(method, Int4LinearMethod) else "weight"
    w = torch.randn(n, k, device="cuda", generator=torch.Generator("cuda").manual_seed(0)) * 0.05
    layer.slot(slot).weight_loader(layer.slot(slot), w.bfloat16(), None)  # type: ignore[attr-defined]
    return layer


@pytest.mark.parametrize("m", [1, 7, 64, 4096])
def test_fp8_scaled_mm_equals_the_reference(m):
    layer = _layer(Fp8LinearMethod(), 1024, 4096)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = fp8_linear_ref(x, layer.slot("weight"), layer.slot("weight_scale"))
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_int4_kernel_equals_the_reference(m):
    from engine.kernels.w4a16 import w4a16_linear_ref

    layer = _layer(Int4LinearMethod(), 1024, 4096)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    args = [layer.slot(n) for n in ("qweight", "scales", "mins")]
    ref = w4a16_linear_ref(x, *args, layer.group_size)  # type: ignore[call-arg]
    torch.testing.assert_close(layer(x), ref, rtol=2e-2, atol=2e-2)


def test_fp8_capability_check_passes_on_this_gpu():
    from engine.quant.fp8 import check_fp8_device

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    check_fp8_device(torch.device("cuda"))


@pytest.mark.parametrize("quantization", ["fp8", "int4"])
def test_llm_serves_quantized_with_cuda_graphs(tmp_path, quantization):
    from engine import LLM, SamplingParams

    path = build_float(tmp_path) if quantization == "int4" else build_fp8(tmp_path)
    kwargs = {"quantization": "int4"} if quantization == "int4" else {}
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
    with LLM(str(path), dtype="bfloat16", show_progress=False, **kwargs) as llm:
        outs = llm.generate([[5, 6, 7, 8], [9, 10, 11]], params)
        model = llm.engine.runner.model
        methods = {m.method.name for m in model.modules() if isinstance(m, LinearBase)}
        assert llm.engine.runner.graphs is not None
    assert methods == {quantization}
    assert all(len(o.token_ids) == 8 for o in outs)
