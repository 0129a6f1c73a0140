"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) equal transformers token for
token (float32, CPU, greedy), and the MoE configs that cannot be served are refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.distributed import TPGroup, get_tp_group, set_tp_group
from engine.errors import EngineConfigError, ModelLoadError
from engine.layers.moe import SparseMoeBlock, route
from engine.models.moe import moe_checkpoint_shapes
from tests.engine import tiny_models

NUM_NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, min_tokens=NUM_NEW)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_moe")
    return {name: tiny_models.build(name, root) for name in tiny_models.MOE_ARCHS}


@pytest.fixture(scope="module")
def hf_reference(checkpoints: dict[str, Path]) -> dict[str, list[list[int]]]:
    prompts = tiny_models.mixed_prompts()
    return {
        name: tiny_models.hf_greedy(path, prompts, NUM_NEW) for name, path in checkpoints.items()
    }


def _generate(path: Path, prompts: list[list[int]], **kwargs: Any) -> list[list[int]]:
    return tiny_models.engine_greedy(path, prompts, NUM_NEW, **kwargs)


@pytest.mark.parametrize("arch", tiny_models.MOE_ARCHS)
def test_continuous_batching_equals_hf(arch: str, checkpoints, hf_reference) -> None:
    """8 prompts of 3 to 300 tokens x 32 greedy tokens: a prefill step of every prompt, then
    decode steps of 8 rows (chunked prefill is token-local in an MoE block, as in a dense MLP:
    test_hf_equality covers it for the dense architectures)."""
    got = _generate(checkpoints[arch], tiny_models.mixed_prompts())
    assert got == hf_reference[arch]


@pytest.mark.parametrize("arch", tiny_models.MOE_ARCHS)
def test_expert_without_tokens_equals_hf(arch: str, checkpoints, hf_reference) -> None:
    """One prompt of 3 tokens alone: its prefill routes 3 x top-2 = at most 6 of the 8 experts
    and every decode step 2, so each step leaves some expert with no token."""
    path = checkpoints[arch]
    prompt = tiny_models.mixed_prompts()[0]
    assert len(prompt) == 3
    cfg = ModelConfig.from_path(path)
    assert cfg.moe is not None and len(prompt) * cfg.moe.top_k < cfg.moe.num_experts
    assert _generate(path, [prompt]) == hf_reference[arch][:1]


def test_config_reads_each_architecture(checkpoints) -> None:
    mixtral = ModelConfig.from_path(checkpoints["mixtral"]).moe
    qwen2 = ModelConfig.from_path(checkpoints["qwen2_moe"])
    qwen3 = ModelConfig.from_path(checkpoints["qwen3_moe"])
    assert mixtral is not None and (mixtral.num_experts, mixtral.top_k) == (8, 2)
    assert mixtral.renormalize and mixtral.intermediate_size == 32
    assert qwen2.moe is not None and qwen2.attention_bias and not qwen2.moe.renormalize
    assert qwen2.moe.shared_expert_intermediate_size == 48
    assert qwen3.moe is not None and qwen3.qk_norm and qwen3.moe.renormalize
    assert qwen3.moe.shared_expert_intermediate_size == 0


@pytest.mark.parametrize("arch", tiny_models.MOE_ARCHS)
def test_checkpoint_shapes_describe_the_checkpoint(arch: str, checkpoints) -> None:
    """moe_checkpoint_shapes (what dummy weights fill) names every tensor transformers saved."""
    from safetensors import safe_open

    path = checkpoints[arch]
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    assert moe_checkpoint_shapes(ModelConfig.from_path(path)) == saved


@pytest.mark.parametrize("arch", tiny_models.MOE_ARCHS)
def test_dummy_weights_fill_every_expert(arch: str, checkpoints) -> None:
    """load_format="dummy" (the benchmarks' way) builds the experts too, and generates."""
    out = _generate(checkpoints[arch], [[5, 6, 7]], load_format="dummy")
    assert len(out[0]) > 0


def test_route_renormalizes_top_k() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    weights, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, dim=-1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))


def _hf_config(checkpoints: dict[str, Path], arch: str, **overrides: Any) -> dict[str, Any]:
    hf = json.loads((checkpoints[arch] / "config.json").read_text())
    return {**hf, **overrides}


@pytest.mark.parametrize(
    "arch,overrides,field",
    [
        ("qwen3_moe", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ("mixtral", {"num_local_experts": 0}, "num_experts"),
        ("qwen2_moe", {"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ("qwen3_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen2_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ],
)
def test_bad_moe_config_is_refused_by_name(checkpoints, arch, overrides, field) -> None:
    with pytest.raises(ModelLoadError, match=rf"^{field}\b"):
        ModelConfig.from_dict(_hf_config(checkpoints, arch, **overrides))


def test_missing_expert_count_is_refused(checkpoints) -> None:
    hf = _hf_config(checkpoints, "qwen3_moe")
    for key in ("num_experts", "num_local_experts"):
        hf.pop(key, None)
    with pytest.raises(ModelLoadError, match="^num_experts:"):
        ModelConfig.from_dict(hf)


def test_quantized_moe_is_refused(checkpoints) -> None:
    with pytest.raises(ModelLoadError, match="^quantization:"):
        ModelConfig.from_dict(_hf_config(checkpoints, "mixtral"), quantization="fp8")


def test_tensor_parallel_moe_is_refused(checkpoints) -> None:
    """A TP group of 2 (as a follower rank would see it): the MoE block refuses to build."""
    cfg = ModelConfig.from_path(checkpoints["qwen3_moe"])
    previous = get_tp_group()
    set_tp_group(TPGroup(rank=0, size=2))
    try:
        with pytest.raises(EngineConfigError, match="^tensor_parallel_size: 2"):
            SparseMoeBlock(cfg)
    finally:
        set_tp_group(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", tiny_models.MOE_ARCHS)
def test_fused_kernel_on_gpu_equals_hf(arch: str, checkpoints, hf_reference) -> None:
    """float32 on CUDA: the fused Triton MoE kernel inside the engine's CUDA graphs (decode)
    and eager prefill gives transformers' tokens."""
    llm = LLM(
        str(checkpoints[arch]),
        device="cuda",
        dtype="float32",
        show_progress=False,
        num_kv_blocks=4096,
    )
    try:
        assert llm.engine.runner.graphs is not None
        outs = llm.generate(tiny_models.mixed_prompts(), GREEDY)
        assert [o.token_ids for o in outs] == hf_reference[arch]
    finally:
        llm.shutdown()
