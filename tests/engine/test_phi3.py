"""Phi-3 beyond HF equality (tests/engine/test_hf_equality.py): its fused checkpoint tensors
load per TP rank reading only the rank's rows, dummy weights use its names, the TP pass fuses
its blocks, its sliding window bounds max_model_len, and rope variants it cannot reproduce are
rejected when the config is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.distributed import TPGroup, fused_norm, set_tp_group
from engine.distributed.parallel_state import AllReduceMode, Reduction
from engine.distributed.tp_pass import apply_fused_residual_norm
from engine.errors import InvalidRequestError, ModelLoadError
from engine.models.phi3 import Phi3ForCausalLM
from engine.weights import checkpoint_shapes, fill_dummy, load_safetensors
from tests.engine import tiny_models


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("phi3", tmp_path_factory.mktemp("tiny_phi3"))


def _build(cfg: ModelConfig, rank: int, size: int) -> Phi3ForCausalLM:
    set_tp_group(TPGroup(rank=rank, size=size))  # building and loading run no collective
    try:
        return Phi3ForCausalLM(cfg, 64)
    finally:
        set_tp_group(TPGroup())


class _SpySlice:
    """A safetensors slice that records (name, elements read, elements in the tensor)."""

    def __init__(self, inner: Any, log: list[tuple[str, int, int]], name: str) -> None:
        self.inner, self.log, self.name = inner, log, name

    def get_shape(self) -> list[int]:
        return self.inner.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        out = self.inner[index]
        self.log.append((self.name, out.numel(), int(torch.Size(self.inner.get_shape()).numel())))
        return out


def _expected_shards(
    full: dict[str, torch.Tensor], cfg: ModelConfig, rank: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s qkv_proj and gate_up_proj rows of layer 1, cut from the fused tensors."""
    hd, q_rows = cfg.head_dim, cfg.num_heads * cfg.head_dim
    qkv = full["model.layers.1.self_attn.qkv_proj.weight"]
    q, k, v = qkv.split([q_rows, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd])
    local_q, kv_rows = q_rows // size, max(1, cfg.num_kv_heads // size) * hd
    kv_start = rank * cfg.num_kv_heads // size * hd  # replicated when TP exceeds the KV heads
    want_qkv = torch.cat(
        [
            q[rank * local_q : (rank + 1) * local_q],
            k[kv_start : kv_start + kv_rows],
            v[kv_start : kv_start + kv_rows],
        ]
    )
    gate, up = full["model.layers.1.mlp.gate_up_proj.weight"].chunk(2)
    inter = cfg.intermediate_size // size
    mine = slice(rank * inter, (rank + 1) * inter)
    want_gate_up = torch.cat([gate[mine], up[mine]])
    return want_qkv, want_gate_up


@pytest.mark.parametrize("size", [2, 4])
def test_fused_tensors_load_only_the_ranks_rows(size: int, phi3: Path, monkeypatch) -> None:
    """At TP 4 the 2 KV heads are replicated: ranks 0-1 hold head 0, ranks 2-3 head 1."""
    from engine import weights

    full = load_file(str(phi3 / "model.safetensors"))
    cfg = ModelConfig.from_path(phi3, "float32")
    real = weights._iter_slices
    for rank in range(size):
        log: list[tuple[str, int, int]] = []
        monkeypatch.setattr(
            weights,
            "_iter_slices",
            lambda files, show, log=log: ((n, _SpySlice(s, log, n)) for n, s in real(files, show)),
        )
        model = _build(cfg, rank, size)
        load_safetensors(model, phi3, show_progress=False)
        params = dict(model.named_parameters())
        want_qkv, want_gate_up = _expected_shards(full, cfg, rank, size)
        torch.testing.assert_close(
            params["model.layers.1.self_attn.qkv_proj.weight"], want_qkv, rtol=0, atol=0
        )
        torch.testing.assert_close(
            params["model.layers.1.mlp.gate_up_proj.weight"], want_gate_up, rtol=0, atol=0
        )
        fused_reads = [(got, total) for n, got, total in log if "qkv_proj" in n or "gate_up" in n]
        assert len(fused_reads) == 5 * cfg.num_layers  # q, k, v, gate, up: one read each
        assert sum(got for got, _ in fused_reads) < 0.75 * sum(total for _, total in fused_reads)


def test_fused_tensor_of_the_wrong_size_names_it(phi3: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    full = load_file(str(phi3 / "model.safetensors"))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    full[name] = full[name][:-16].contiguous()  # one head's rows short
    save_file(full, str(tmp_path / "model.safetensors"))
    cfg = ModelConfig.from_path(phi3, "float32")
    with pytest.raises(ModelLoadError, match=rf"{name}: checkpoint has 112 rows"):
        load_safetensors(_build(cfg, 0, 1), tmp_path, show_progress=False)


def test_checkpoint_shapes_are_the_real_checkpoints(phi3: Path) -> None:
    """Dummy weights name and shape every tensor as transformers saves a Phi-3 checkpoint."""
    full = load_file(str(phi3 / "model.safetensors"))
    shapes = checkpoint_shapes(ModelConfig.from_path(phi3, "float32"))
    assert shapes == {name: tuple(t.shape) for name, t in full.items()}


def test_dummy_weights_are_the_same_model_at_every_tp_size(phi3: Path) -> None:
    """fill_dummy hands full fused tensors to the same hook: each TP 2 rank holds its rows of
    the TP 1 model's parameters."""
    cfg = ModelConfig.from_path(phi3, "float32")
    whole = _build(cfg, 0, 1)
    fill_dummy(whole, seed=3)
    full = dict(whole.named_parameters())
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    for rank in range(2):
        part = _build(cfg, rank, 2)
        fill_dummy(part, seed=3)
        got = dict(part.named_parameters())
        for name, sizes in (
            ("self_attn.qkv_proj.weight", [q_rows, kv_rows, kv_rows]),
            ("mlp.gate_up_proj.weight", [cfg.intermediate_size] * 2),
        ):
            shards = full[f"model.layers.0.{name}"].split(sizes)
            want = torch.cat([shard.chunk(2)[rank] for shard in shards])
            torch.testing.assert_close(got[f"model.layers.0.{name}"], want, rtol=0, atol=0)


def test_tp_pass_fuses_phi3_blocks(phi3: Path) -> None:
    """Phi-3 reuses the Llama decoder layer: the pass fuses both boundaries of every layer, and
    the transformed model's greedy tokens equal the untransformed one's (TP = 1, reference op)."""
    prompts = tiny_models.mixed_prompts(3, seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
    plain = LLM(str(phi3), device="cpu", show_progress=False, num_kv_blocks=96)
    reference = [o.token_ids for o in plain.generate(prompts, greedy)]
    fused = LLM(str(phi3), device="cpu", show_progress=False, num_kv_blocks=96)
    op = fused_norm.ReferenceFusedNorm(lambda x: x, 8)
    tp = TPGroup(reduction=Reduction(AllReduceMode.FUSED, "fused-reference", fused_norm=op))
    model = fused.engine.runner.model
    assert apply_fused_residual_norm(model, tp) == 2 * len(model.model.layers)
    assert [o.token_ids for o in fused.generate(prompts, greedy)] == reference


def test_sliding_window_bounds_max_model_len(phi3: Path) -> None:
    """The engine has no sliding-window attention: it serves sequences inside the window
    (512 here), where full attention is what transformers computes."""
    llm = LLM(str(phi3), device="cpu", show_progress=False, num_kv_blocks=64)
    assert llm.engine.max_model_len == 512
    with pytest.raises(InvalidRequestError, match="max_model_len 512"):
        llm.generate([[5] * 500], SamplingParams(max_tokens=20))


def _phi3_config(phi3: Path, **changes: Any) -> dict[str, Any]:
    return {**json.loads((phi3 / "config.json").read_text()), **changes}


@pytest.mark.parametrize(
    "changes,field",
    [
        (
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 256,
                }
            },
            "rope_scaling: type 'longrope' is not supported",
        ),
        (
            {"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
            "rope_scaling: type 'su' is not supported",
        ),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}},
            "rope_scaling.partial_rotary_factor: 0.75 is not supported",
        ),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor: 0.5 is not supported"),
        ({"hidden_act": "gelu_new"}, "hidden_act: 'gelu_new' is not supported"),
    ],
)
def test_unsupported_variants_rejected_naming_the_field(
    phi3: Path, changes: dict[str, Any], field: str
) -> None:
    with pytest.raises(ModelLoadError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(_phi3_config(phi3, **changes))


def test_config_without_architectures_and_with_attention_bias(phi3: Path) -> None:
    """`model_type` "phi3" alone names the class; Phi-3's qkv_proj has no bias whatever the
    config says (as in transformers)."""
    hf = _phi3_config(phi3, attention_bias=True)
    del hf["architectures"]
    cfg = ModelConfig.from_dict(hf)
    assert cfg.architecture == "Phi3ForCausalLM" and not cfg.attention_bias
    assert cfg.rope_scaling is None and cfg.sliding_window == 512
