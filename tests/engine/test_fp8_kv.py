"""The FP8 KV cache (kv_cache_dtype="fp8"): config names and bad input, bytes and block counts,
the scales (1.0, calibrated, from the checkpoint) and their place in the block-hash salt, and
an engine serving from an FP8 cache on CPU (the torch backend)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.attention.calibration import scales_from_amax
from engine.attention.select import check_fp8_capability
from engine.config import EngineConfig, ModelConfig
from engine.errors import EngineConfigError
from engine.kv.spec import KVCacheSpec, LayerScales
from engine.runner.kv_cache import checkpoint_kv_scales, kv_cache_spec, num_kv_blocks
from kvtransfer.handle import KVHandle, KVLayout
from tests.engine import tiny_models

GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PROMPT_TOKENS = 4096
# Llama-3-8B's cache geometry (32 layers, 8 KV heads of 128)
LLAMA3_8B = dict(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("llama31", tmp_path_factory.mktemp("tiny"))


def _llm(path: Path, **kwargs: object) -> LLM:
    return LLM(str(path), device="cpu", show_progress=False, kv_cache_bytes=1 << 20, **kwargs)


@pytest.mark.parametrize(
    "name,dtype",
    [("fp8", "float8_e4m3fn"), ("fp8_e4m3", "float8_e4m3fn"), ("fp8_e5m2", "float8_e5m2")],
)
def test_vllm_names_resolve_to_fp8_dtypes(name: str, dtype: str) -> None:
    assert EngineConfig(model="m", kv_cache_dtype=name).resolved_kv_cache_dtype("bfloat16") == dtype


@pytest.mark.parametrize("value", ["fp4", "fp8_e4m3fnuz", "int8", "FP8"])
def test_unknown_kv_cache_dtype_is_refused_naming_the_option(value: str) -> None:
    with pytest.raises(EngineConfigError, match="^kv_cache_dtype: "):
        EngineConfig(model="m", kv_cache_dtype=value)


def test_calculate_kv_scales_needs_an_fp8_cache() -> None:
    with pytest.raises(EngineConfigError, match="^calculate_kv_scales: "):
        EngineConfig(model="m", calculate_kv_scales=True)
    EngineConfig(model="m", kv_cache_dtype="fp8", calculate_kv_scales=True)


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (8, 6)])
def test_fp8_on_a_gpu_without_fp8_is_refused(capability: tuple[int, int]) -> None:
    with pytest.raises(EngineConfigError, match="^kv_cache_dtype: .*compute capability >= 8.9"):
        check_fp8_capability("float8_e4m3fn", capability)


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_on_ada_and_hopper_is_accepted(capability: tuple[int, int]) -> None:
    check_fp8_capability("float8_e4m3fn", capability)


def test_a_4k_prompt_is_half_the_bytes_and_twice_the_blocks(checkpoint: Path) -> None:
    """At Llama-3-8B's geometry: a 4096-token prompt's KV, per the spec and per the transfer
    handle, is half the bytes in FP8 as in bf16, and the same budget holds twice the blocks."""
    scales = (LayerScales(1.0, 1.0),) * LLAMA3_8B["num_layers"]
    bf16 = KVCacheSpec(**LLAMA3_8B, kv_dtype="bfloat16")
    fp8 = KVCacheSpec(**LLAMA3_8B, kv_dtype="float8_e4m3fn", scales=scales)
    assert fp8.bytes_per_token() * 2 == bf16.bytes_per_token() == 128 * 1024  # 128 KiB a token
    handles = [_handle(spec, PROMPT_TOKENS) for spec in (bf16, fp8)]
    assert handles[0].num_bytes == PROMPT_TOKENS * bf16.bytes_per_token() == 512 * 2**20
    assert handles[1].num_bytes * 2 == handles[0].num_bytes
    budget = EngineConfig(model="m", kv_cache_bytes=4 << 30)
    cfg = ModelConfig.from_path(str(checkpoint))
    blocks = [
        num_kv_blocks(cfg, budget, torch.device("cpu"), s, torch.bfloat16) for s in (bf16, fp8)
    ]
    assert blocks[1] == 2 * blocks[0] == 2 * (4 << 30) // bf16.bytes_per_block()


def _handle(spec: KVCacheSpec, num_tokens: int) -> KVHandle:
    num_blocks = -(-num_tokens // spec.block_size)
    layout = KVLayout.from_spec(spec)
    return KVHandle("t", "w", ("a",), layout, tuple(range(1, num_blocks + 1)), (), num_tokens, "m")


def test_engine_serves_from_an_fp8_cache(checkpoint: Path) -> None:
    """Same budget: four times the float32 blocks; the salt names the KV dtype and the scales;
    greedy tokens of the tiny model agree with the float32 cache."""
    base, fp8 = _llm(checkpoint), _llm(checkpoint, kv_cache_dtype="fp8")
    spec = fp8.engine.kv_spec
    assert spec.kv_dtype == "float8_e4m3fn" and spec.scales == (LayerScales(1.0, 1.0),) * 2
    assert fp8.engine.runner.kv_cache.dtype == torch.float8_e4m3fn
    assert fp8.engine.runner.num_blocks == 4 * base.engine.runner.num_blocks
    salt = f"{base.engine.kv_manager.salt}|kv=float8_e4m3fn|scales={spec.scales_digest()}"
    assert fp8.engine.kv_manager.salt == salt
    prompt = list(range(3, 40))
    want = base.generate([prompt], GREEDY)[0].token_ids
    assert fp8.generate([prompt], GREEDY)[0].token_ids[:4] == want[:4]


def test_calibrated_scales_map_the_largest_value_to_448(checkpoint: Path) -> None:
    """calculate_kv_scales: every layer's scale is its calibration amax / 448 rounded up to a
    power of two (the tiny model's |K| < 448: scales below 1); other scales, another salt."""
    llm = _llm(checkpoint, kv_cache_dtype="fp8", calculate_kv_scales=True)
    spec = llm.engine.kv_spec
    assert spec.scales is not None
    for s in spec.scales:
        for x in (s.k_scale, s.v_scale):
            assert x < 1.0 and math.log2(x) == int(math.log2(x))
    plain = _llm(checkpoint, kv_cache_dtype="fp8")
    assert llm.engine.kv_manager.salt != plain.engine.kv_manager.salt  # scales enter the salt
    out = llm.generate([list(range(3, 40))], GREEDY)[0].token_ids
    assert out[:4] == plain.generate([list(range(3, 40))], GREEDY)[0].token_ids[:4]
    cache = llm.engine.runner.kv_cache
    assert float(cache.float().abs().max()) <= 448.0  # stored values stay in range


def test_scales_from_amax_round_up_to_a_power_of_two() -> None:
    scales = scales_from_amax([448.0, 300.0, 0.0], [1.0, 1e-3, float("nan")], "float8_e4m3fn")
    assert scales == (
        LayerScales(1.0, 2.0**-8),  # 1/448 rounds up to 2^-8
        LayerScales(1.0, 2.0**-18),  # 300/448 -> 1: |K| <= 300 stays in range
        LayerScales(1.0, 1.0),  # nothing stored / not finite: unscaled
    )
    assert scales_from_amax([57344.0 * 3], [1.0], "float8_e5m2")[0].k_scale == 4.0


def test_checkpoint_scales_are_read_per_layer(tmp_path: Path) -> None:
    tensors = {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.5),
        "model.layers.0.self_attn.v_scale": torch.tensor(0.25),
        "model.layers.1.self_attn.kv_scale": torch.tensor([2.0]),  # one scale for both
        "model.layers.0.mlp.down_proj.weight": torch.zeros(2, 2),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    scales = checkpoint_kv_scales(tmp_path, 2)
    assert scales == (LayerScales(0.5, 0.25), LayerScales(2.0, 2.0))
    with pytest.raises(EngineConfigError, match="^kv_cache_dtype: .*not \\[2\\]"):
        checkpoint_kv_scales(tmp_path, 3)
    assert checkpoint_kv_scales(tmp_path / "nowhere", 2) is None


def test_checkpoint_scales_win_over_calibration(tmp_path: Path, checkpoint: Path) -> None:
    save_file(
        {
            f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor(0.125)
            for i in (0, 1)
            for kv in "kv"
        },
        str(tmp_path / "model.safetensors"),
    )
    cfg = ModelConfig.from_path(str(checkpoint))
    engine = EngineConfig(model="m", kv_cache_dtype="fp8", calculate_kv_scales=True)
    spec = kv_cache_spec(cfg, engine, 1, model=None, model_path=str(tmp_path))
    assert spec.scales == (LayerScales(0.125, 0.125),) * 2
    unscaled = kv_cache_spec(cfg, EngineConfig(model="m"), 1)
    assert unscaled.scales is None and unscaled.scales_digest() == ""
