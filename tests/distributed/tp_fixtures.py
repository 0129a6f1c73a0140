"""Shared set-up for the TP tests: one local Ray instance per module, tiny checkpoints
(every architecture of tests/engine/tiny_models plus an odd-vocabulary variant), short prompts."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.engine import tiny_models

ODD_VOCAB = "llama_vocab501"  # 501 rows: not a multiple of the padding; 1 KV head; tied head
ALL_MODELS = (*tiny_models.ARCHS, ODD_VOCAB)
PROMPT_LENGTHS = (3, 41, 17, 64, 5, 29, 33, 50)


def build_odd_vocab(root: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = root / ODD_VOCAB
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(4321)
    cfg = LlamaConfig(
        **{**tiny_models.COMMON, "vocab_size": 501, "num_key_value_heads": 1},
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(cfg).float().eval().save_pretrained(
        str(path), safe_serialization=True
    )
    return path


def build(name: str, root: Path) -> Path:
    return build_odd_vocab(root) if name == ODD_VOCAB else tiny_models.build(name, root)


def prompts(vocab: int = 500) -> list[list[int]]:
    """The issue's 8 prompts, kept short so the gloo runs stay fast on two shared cores."""
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    root = str(Path(__file__).resolve().parents[2])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_tp")
    return {name: build(name, root) for name in ALL_MODELS}
