"""TP as a pass over an unchanged model (engine.distributed.tp_pass), on CPU at TP = 1.

The model files know nothing of TP; the fused all-reduce + residual add + RMSNorm is put in by
a pass after loading. Here the pass runs with the reference fused op over an identity "group"
(TP = 1), so the transformed model must equal the untransformed one exactly, through the fused
calls (small steps) and the unfused fallback (steps of more rows than the op takes). Two ranks
over gloo: tests/distributed/test_tp_equality.py::test_tp2_fused_norm_equals_tp1.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.distributed import fast_allreduce, fused_norm
from engine.distributed.fast_allreduce import ReductionSpec, choose_reduction
from engine.distributed.parallel_state import AllReduceMode, Reduction, TPGroup
from engine.distributed.tp_pass import (
    FusedAllReduceRMSNorm,
    apply_fused_residual_norm,
    fusion_sites,
)
from engine.errors import EngineConfigError
from engine.layers.linear import RowParallelLinear
from engine.runner.inputs import build_step_inputs
from tests.engine import tiny_models

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12)
MAX_FUSED_ROWS = 8  # prefill steps take the unfused fallback, decode steps the fused op


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_pass")
    return {name: tiny_models.build(name, root) for name in ("llama31", "qwen2")}


class _CountingSum:
    """An identity all-reduce (one rank) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def _fused_group(max_rows: int = MAX_FUSED_ROWS) -> tuple[TPGroup, _CountingSum]:
    counter = _CountingSum()
    op = fused_norm.ReferenceFusedNorm(counter, max_rows)
    reduction = Reduction(AllReduceMode.FUSED, "fused-reference", fused_norm=op)
    return TPGroup(reduction=reduction), counter


def _llm(path: Path) -> LLM:
    return LLM(str(path), device="cpu", show_progress=False, num_kv_blocks=128)


def _imports(path: Path) -> list[str]:
    modules: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.append(node.module)
    return modules


@pytest.mark.parametrize("module", ["engine/models/llama.py", "engine/layers/norm.py"])
def test_model_file_and_norm_do_not_import_distributed(module: str) -> None:
    imports = _imports(ROOT / module)
    assert imports and not any(m.startswith("engine.distributed") for m in imports), imports


def test_tp1_model_has_plain_tensors_only(checkpoints: dict[str, Path]) -> None:
    """At TP = 1 no module returns anything but tensors (no partial-sum wrapper anywhere), no
    norm is swapped and every row-parallel layer reduces its own output."""
    llm = _llm(checkpoints["llama31"])
    model = llm.engine.runner.model
    assert llm.engine.runner.all_reduce_mode == "none"
    assert not hasattr(fused_norm, "PartialSum")
    assert not any(isinstance(m, FusedAllReduceRMSNorm) for m in model.modules())
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    assert rows and all(m.reduce_output for m in rows)
    outputs: list[object] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in model.modules()
    ]
    try:
        llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0.0, max_tokens=2))
    finally:
        for hook in hooks:
            hook.remove()
    flat = [o for out in outputs for o in (out if isinstance(out, tuple) else (out,))]
    assert flat and all(isinstance(o, torch.Tensor) for o in flat)


def test_pass_finds_every_boundary_in_execution_order(checkpoints: dict[str, Path]) -> None:
    llm = _llm(checkpoints["llama31"])  # held: a dropped LLM releases its model
    model = llm.engine.runner.model
    layers = model.model.layers
    sites = fusion_sites(model)
    expected = []
    for i, layer in enumerate(layers):
        expected.append((layer.self_attn.o_proj, layer, "post_attention_layernorm"))
        nxt = (layers[i + 1], "input_layernorm") if i + 1 < len(layers) else (model.model, "norm")
        expected.append((layer.mlp.down_proj, *nxt))
    assert [(s.linear, s.owner, s.norm_name) for s in sites] == expected


def test_pass_leaves_a_model_unchanged_without_a_fused_op(checkpoints: dict[str, Path]) -> None:
    llm = _llm(checkpoints["llama31"])  # held: a dropped LLM releases its model
    model = llm.engine.runner.model
    assert apply_fused_residual_norm(model, TPGroup()) == 0
    assert not any(isinstance(m, FusedAllReduceRMSNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["llama31", "qwen2"])
def test_transformed_model_equals_untransformed(name: str, checkpoints: dict[str, Path]) -> None:
    """Greedy tokens and last-position logits are identical; the fused op ran on the small
    steps with alternating slots (it raises otherwise), the fallback on the large ones."""
    prompts = tiny_models.mixed_prompts(4, seed=5)
    plain = _llm(checkpoints[name])
    reference = [o.token_ids for o in plain.generate(prompts, GREEDY)]
    fused = _llm(checkpoints[name])
    model = fused.engine.runner.model
    names_before = [n for n, _ in model.named_parameters()]
    tp, counter = _fused_group()
    num_layers = len(model.model.layers)
    assert apply_fused_residual_norm(model, tp) == 2 * num_layers
    assert apply_fused_residual_norm(model, tp) == 0  # a fused site no longer matches
    assert [n for n, _ in model.named_parameters()] == names_before  # checkpoint names unchanged
    assert [o.token_ids for o in fused.generate(prompts, GREEDY)] == reference
    assert counter.calls > 0 and counter.calls % (2 * num_layers) == 0
    for i, prompt in enumerate(prompts[:2]):
        logits = []
        for llm in (plain, fused):
            one = SamplingParams(temperature=0.0, max_tokens=1)
            llm.engine.add_request(f"probe{i}", prompt, one)
            out = llm.engine.scheduler.schedule()
            host = build_step_inputs(out, llm.engine.config.block_size)
            logits.append(llm.engine.runner.compute_logits(llm.engine.runner.forward(host)))
            llm.engine.abort([f"probe{i}"])
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)


def test_engine_config_takes_mode_names_and_rejects_others() -> None:
    assert EngineConfig(model="m", tp_all_reduce="fused").tp_all_reduce is AllReduceMode.FUSED
    skip = EngineConfig(model="m", tp_all_reduce=AllReduceMode.SKIP)
    assert skip.tp_all_reduce is AllReduceMode.SKIP
    with pytest.raises(EngineConfigError, match="tp_all_reduce: 'fast' is not one of"):
        EngineConfig(model="m", tp_all_reduce="fast")


@pytest.mark.parametrize(
    "mode,label",
    [
        (AllReduceMode.AUTO, "gloo"),
        (AllReduceMode.NCCL, "gloo"),
        (AllReduceMode.SYMM_MEM, "gloo"),
        (AllReduceMode.FUSED, "fused-reference"),
        (AllReduceMode.SKIP, "skip"),
    ],
)
def test_cpu_reductions_resolve_once_to_a_concrete_mode(mode: AllReduceMode, label: str) -> None:
    group = object()  # on CPU choosing runs no collective
    spec = ReductionSpec(mode, hidden=64, fp32_max_rows=32)
    reduction = choose_reduction(spec, group, torch.device("cpu"))  # type: ignore[arg-type]
    assert reduction.label == label and reduction.mode is not AllReduceMode.AUTO
    assert reduction.fp32_max_rows == 32
    assert (reduction.fused_norm is not None) == (mode is AllReduceMode.FUSED)
    assert not hasattr(fast_allreduce, "install")  # the group is built once, never re-installed
