"""Model-based speculative proposers: `draft_model`, the trained draft head (`eagle`) and
`tandem train-draft`.

Exactness: greedy output with each proposer equals greedy output without speculation, on a
tiny random Llama with the tiny-random model's tokenizer (so stop strings work), with chunked
prefill, prefix hits and preemption in the mix. The drafts come from a 1-layer truncated copy
of the target and from an untrained head (accepts rarely): verification must keep the output
either way. Each test asserts the mix happened (preemptions and prefix hits counted).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.demo_model import resolve_model_path
from engine.errors import EngineConfigError
from engine.spec.config import SpeculativeConfig
from engine.spec.draft_head import DraftHead, HeadConfig, save_head
from engine.spec.draft_model import write_truncated_draft
from engine.spec.factory import build_proposer
from tests.engine import tiny_models

# A small pool (preemption), small steps (chunked prefill)
ENGINE = dict(device="cpu", show_progress=False, num_kv_blocks=10, max_num_batched_tokens=48)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread for this module: on a loaded 2-core host two OpenMP threads wait on
    each other at every op (3x slower here); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/engine/tiny_models' Llama shape (2 layers, hidden 64) over tiny-random's 512-token
    tokenizer, random weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("target")
    torch.manual_seed(1234)
    hf = LlamaConfig(**{**tiny_models.COMMON, "vocab_size": 512, "bos_token_id": 0})
    AutoModelForCausalLM.from_config(hf).float().save_pretrained(str(path))
    source = Path(resolve_model_path("tiny-random"))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (path / name).write_bytes((source / name).read_bytes())
    return path


@pytest.fixture(scope="module")
def draft_dir(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_truncated_draft(target_dir, tmp_path_factory.mktemp("draft"), 1)


@pytest.fixture(scope="module")
def random_head(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = HeadConfig.for_target(ModelConfig.from_path(target_dir), "tiny", 128)
    out = tmp_path_factory.mktemp("head")
    save_head(DraftHead(cfg), cfg, out)
    return out


def _prompts() -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(5, 500, (40,), generator=gen).tolist()
    ids = [torch.randint(5, 500, (n,), generator=gen).tolist() for n in (3, 100, 17)]
    # repeated text: the truncated draft and the target agree on copies
    return [*ids, shared + [7, 8], "Hello, world! Hello, world! Hello,", shared + [9]]


PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=24),
    SamplingParams(temperature=0.0, max_tokens=24, stop=["ques"]),
]


def _generate(llm: LLM) -> list[list[int]]:
    """Two rounds (the second hits the prefix cache), a stop string in the mix."""
    prompts = _prompts()
    params = [PARAMS[i % 2] for i in range(len(prompts))]
    first = [o.token_ids for o in llm.generate(prompts, params)]
    return first + [o.token_ids for o in llm.generate(prompts[-2:], params[-2:])]


@pytest.fixture(scope="module")
def reference(target_dir: Path) -> list[list[int]]:
    with LLM(str(target_dir), **ENGINE) as llm:
        return _generate(llm)


def _check_exact(target: Path, spec: dict[str, Any], reference: list[list[int]]) -> Any:
    with LLM(str(target), **ENGINE, speculative_config=spec) as llm:
        assert _generate(llm) == reference
        sched = llm.engine.scheduler
        stats = sched.stats()
        assert stats.num_preemptions_total > 0 and stats.prefix_hit_tokens > 0, "the mix"
        llm.engine.step()  # delivers the last finished ids to forget()
        return (
            llm.engine.runner.proposer,
            sched.num_draft_tokens_total,
            sched.num_accepted_tokens_total,
        )


def test_draft_model_greedy_exact_and_no_leak(
    target_dir: Path, draft_dir: Path, reference: list[list[int]]
) -> None:
    spec = {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3}
    proposer, drafted, accepted = _check_exact(target_dir, spec, reference)
    assert drafted > 0 and accepted > 0
    assert proposer.num_computed == {}


def test_random_head_greedy_exact_and_no_leak(
    target_dir: Path, random_head: Path, reference: list[list[int]]
) -> None:
    spec = {"method": "eagle", "model": str(random_head), "num_speculative_tokens": 4}
    proposer, drafted, _ = _check_exact(target_dir, spec, reference)
    assert drafted > 0
    assert proposer.last == {}


def test_draft_state_dropped_on_abort(target_dir: Path, draft_dir: Path) -> None:
    spec = {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 2}
    with LLM(str(target_dir), device="cpu", show_progress=False, speculative_config=spec) as llm:
        engine = llm.engine
        engine.add_request("a", [5, 6, 7, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=50))
        for _ in range(3):
            engine.step()
        assert "a" in engine.runner.proposer.num_computed
        engine.abort(["a"])
        engine.step()
        assert engine.runner.proposer.num_computed == {}


def test_draft_with_another_vocabulary(target_dir: Path, tmp_path: Path) -> None:
    other = tiny_models.build("llama31", tmp_path)  # vocab 500, the target's is 512
    spec = {"method": "draft_model", "model": str(other), "num_speculative_tokens": 2}
    with pytest.raises(EngineConfigError, match="speculative_config.model.*vocab_size"):
        LLM(str(target_dir), device="cpu", show_progress=False, speculative_config=spec)


def test_draft_with_another_tokenizer(target_dir: Path, draft_dir: Path, tmp_path: Path) -> None:
    swapped = write_truncated_draft(draft_dir, tmp_path / "swapped", 1)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    spec = {"method": "draft_model", "model": str(swapped), "num_speculative_tokens": 2}
    with pytest.raises(EngineConfigError, match="speculative_config.model.*tokenizer"):
        LLM(str(target_dir), device="cpu", show_progress=False, speculative_config=spec)


def test_head_for_another_hidden_size(target_dir: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.from_path(target_dir)
    wrong = HeadConfig.for_target(cfg, "tiny", 64)
    wrong = HeadConfig(
        128, wrong.vocab_size, 64, wrong.rms_norm_eps, {**wrong.target, "hidden_size": 128}
    )
    save_head(DraftHead(wrong), wrong, tmp_path)
    spec = {"method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 2}
    with pytest.raises(EngineConfigError, match="speculative_config.model.*trained for"):
        LLM(str(target_dir), device="cpu", show_progress=False, speculative_config=spec)


def test_not_a_head_checkpoint(target_dir: Path, tmp_path: Path) -> None:
    spec = {"method": "eagle", "model": str(tmp_path), "num_speculative_tokens": 2}
    with pytest.raises(EngineConfigError, match="speculative_config.model.*not a draft-head"):
        LLM(str(target_dir), device="cpu", show_progress=False, speculative_config=spec)


@pytest.mark.parametrize("method", ["draft_model", "eagle"])
def test_tensor_parallel_refused(method: str) -> None:
    # the check comes before anything is loaded: a runner's TP size is all it reads
    runner = SimpleNamespace(engine_cfg=SimpleNamespace(tensor_parallel_size=2))
    config = SpeculativeConfig(method, 2, model="unused")
    with pytest.raises(EngineConfigError, match="speculative_config.method.*tensor_parallel"):
        build_proposer(config, runner)


def test_train_draft_cli_end_to_end(target_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, world!\nThe quick brown fox\nA router in front\n")
    out = tmp_path / "head"
    args = ["train-draft", str(target_dir), "--out", str(out), "--prompts", str(prompts)]
    args += ["--max-prompts", "3", "--max-tokens", "8", "--epochs", "2", "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["target"]["vocab_size"] == 512 and (out / "model.safetensors").is_file()
    spec = {"method": "eagle", "model": str(out), "num_speculative_tokens": 3}
    params = SamplingParams(temperature=0.0, max_tokens=12)
    with LLM(str(target_dir), device="cpu", show_progress=False) as llm:
        want = [o.token_ids for o in llm.generate(["Hello, world!", "The quick"], params)]
    with LLM(str(target_dir), device="cpu", show_progress=False, speculative_config=spec) as llm:
        assert [o.token_ids for o in llm.generate(["Hello, world!", "The quick"], params)] == want


def test_train_draft_cli_bad_prompts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tandem.cli import app

    args = [
        "train-draft",
        "tiny-random",
        "--out",
        str(tmp_path),
        "--prompts",
        str(tmp_path / "none"),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "prompts" in result.output
