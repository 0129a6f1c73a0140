"""Quantized models at TP 2 on CPU (gloo, real Ray actors): an FP8 checkpoint stays close to its
TP = 1 run, and int4 quantized on load equals TP = 1 token for token (its groups never straddle
a shard, so every rank holds exactly TP = 1's slices)."""

from __future__ import annotations

import pytest

from tests.distributed.tp_fixtures import local_ray
from tests.engine.test_quant_engine import _generate
from tests.engine.test_quant_loading import build_float, build_fp8

__all__ = ["local_ray"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_tp")
    return build_float(root), build_fp8(root)


def test_tp2_fp8_checkpoint_close_to_tp1(ckpts, local_ray):
    """Weights split exactly (per-channel scales with their rows); only the row-parallel
    inputs' per-token scales differ (each rank scales its own half of the features)."""
    tp1 = _generate(ckpts[1])[0]
    _, methods, accuracy = _generate(ckpts[1], tp1, tensor_parallel_size=2)
    assert methods == {"fp8"}
    assert accuracy >= 0.8


def test_tp2_int4_equals_tp1(ckpts, local_ray):
    tp1, _, _ = _generate(ckpts[0], quantization="int4")
    tp2, methods, _ = _generate(ckpts[0], quantization="int4", tensor_parallel_size=2)
    assert methods == {"int4"}
    assert tp2 == tp1
