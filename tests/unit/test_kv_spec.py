"""KVCacheSpec: validation names the bad field, byte counts follow the KV dtype and the TP
split, and the module (like the router's cost model that reads it) imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec, KVSpecError, LayerScales, dtype_name
from tandem.contract.worker_api import CostModel

BASE = {
    "num_layers": 4,
    "num_kv_heads": 8,
    "head_dim": 128,
    "block_size": 16,
    "kv_dtype": "bfloat16",
}


def spec(**changes: object) -> KVCacheSpec:
    return KVCacheSpec(**{**BASE, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes,field",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": -1}, "num_kv_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"block_size": 2.5}, "block_size"),
        ({"tp_size": 0}, "tp_size"),
        ({"tp_size": 3}, "num_kv_heads"),  # 8 heads over 3 ranks
        ({"num_kv_heads": 2, "tp_size": 3}, "tp_size"),  # 2 heads replicated over 3 ranks
        ({"kv_dtype": "int8"}, "kv_dtype"),
        ({"kv_dtype": "torch.bfloat16"}, "kv_dtype"),
        ({"scales": (LayerScales(1.0, 1.0),) * 4}, "scales"),  # bf16 is stored unscaled
        ({"kv_dtype": "float8_e4m3fn"}, "scales"),  # fp8 needs them
        ({"kv_dtype": "float8_e4m3fn", "scales": [LayerScales(1.0, 1.0)] * 4}, "scales"),  # a list
        ({"num_layers": True}, "num_layers"),
        ({"kv_dtype": "float8_e4m3fn", "scales": (LayerScales(1.0, 1.0),) * 3}, "scales"),
        ({"kv_dtype": "float8_e5m2", "scales": (LayerScales(1.0, 0.0),) * 4}, "scales"),
        ({"kv_dtype": "float8_e5m2", "scales": (LayerScales(float("nan"), 1.0),) * 4}, "scales"),
    ],
)
def test_invalid_values_name_their_field(changes: dict, field: str) -> None:
    with pytest.raises(KVSpecError) as info:
        spec(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, EngineConfigError)  # a config mistake, by kind


def test_bytes_follow_dtype_heads_and_block_size() -> None:
    s = spec()
    assert s.itemsize == 2 and s.num_local_heads == 8 and not s.is_scaled
    assert s.bytes_per_token() == 2 * 4 * 8 * 128 * 2
    assert s.bytes_per_block() == 16 * s.bytes_per_token()
    assert s.block_shape() == (4, 2, 16, 8, 128)
    assert s.cache_shape(10) == (4, 2, 10, 16, 8, 128)
    assert spec(kv_dtype="float32").bytes_per_block() == 2 * s.bytes_per_block()


def test_tp_split_and_replication() -> None:
    split = spec(tp_size=4)
    assert split.num_local_heads == 2
    assert split.bytes_per_block() == spec().bytes_per_block() // 4
    assert split.bytes_per_token(split.num_kv_heads) == spec().bytes_per_token()  # what moves
    assert split.with_tp(1) == spec()
    replicated = spec(num_kv_heads=2, tp_size=8)
    assert replicated.num_local_heads == 1
    assert replicated.cache_shape(3) == (4, 2, 3, 16, 1, 128)


def test_scaled_dtype_is_one_byte_and_scales_are_part_of_equality() -> None:
    scales = tuple(LayerScales(0.5 + i, 1.0) for i in range(4))
    fp8 = spec(kv_dtype="float8_e4m3fn", scales=scales)
    assert fp8.is_scaled and fp8.itemsize == 1
    assert fp8.bytes_per_block() == spec().bytes_per_block() // 2  # scales take no block bytes
    assert fp8 != spec(kv_dtype="float8_e4m3fn", scales=(LayerScales(1.0, 1.0),) * 4)
    hash(fp8)  # frozen and hashable: usable as a key


def test_dtype_name_strips_the_torch_prefix() -> None:
    assert dtype_name("torch.float16") == "float16"
    assert dtype_name("bfloat16") == "bfloat16"


def test_cost_model_prices_transfers_from_spec_bytes() -> None:
    s = spec(num_layers=32, tp_size=2)
    cost = CostModel(kv_bytes_per_token=s.bytes_per_token(s.num_kv_heads), transfer_s_per_byte=1e-9)
    assert cost.transfer_seconds(1000) == pytest.approx(1000 * 131072 * 1e-9)
    assert CostModel(transfer_s_per_token=1e-5).transfer_seconds(10) == pytest.approx(1e-4)


def test_spec_and_cost_model_import_no_torch() -> None:
    code = (
        "import sys, engine.kv.spec, tandem.contract.worker_api, router.policy\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
