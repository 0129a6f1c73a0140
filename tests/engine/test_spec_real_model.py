"""Speculative decoding on the real model (SmolLM2-135M-Instruct, float32, CPU, greedy): the
tokens and text equal decoding without speculation, stop strings inside accepted runs
included, and the n-gram proposer is accepted on a copying task. Skipped without the model."""

from __future__ import annotations

import pytest

from tests.real_model import skip_without_model

skip_without_model()
pytestmark = pytest.mark.timeout(900)

from engine import LLM, SamplingParams  # noqa: E402
from engine.tokenizer import apply_chat_template  # noqa: E402
from tests.real_model import CHAT_PROMPTS  # noqa: E402

PARAGRAPH = (
    "The quick brown fox jumps over the lazy dog. The dog does not move, and the fox runs "
    "into the forest, where it finds a small river and drinks the cold water."
)
COPY = f"Repeat the following text exactly:\n\n{PARAGRAPH}"


def _prompts(llm: LLM) -> list[str]:
    return [
        apply_chat_template(llm.tokenizer, [{"role": "user", "content": p}])
        for p in [*CHAT_PROMPTS[:3], COPY]
    ]


@pytest.fixture(scope="module")
def engines() -> tuple[LLM, LLM]:
    common = dict(device="cpu", dtype="float32", show_progress=False, max_model_len=512)
    plain = LLM("demo", **common)
    spec = LLM(
        "demo", speculative_config={"method": "ngram", "num_speculative_tokens": 4}, **common
    )
    return plain, spec


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=48),
        SamplingParams(temperature=0.0, max_tokens=48, stop=[".", " the"]),
        SamplingParams(
            temperature=0.0, max_tokens=48, stop=["river"], include_stop_str_in_output=True
        ),
    ],
    ids=["plain", "stop", "stop-included"],
)
def test_speculation_changes_nothing_but_speed(
    engines: tuple[LLM, LLM], params: SamplingParams
) -> None:
    plain, spec = engines
    want = plain.generate(_prompts(plain), params)
    have = spec.generate(_prompts(spec), params)
    for w, h in zip(want, have):
        assert h.token_ids == w.token_ids
        assert h.text == w.text
        assert (h.finish_reason, h.stop_reason) == (w.finish_reason, w.stop_reason)


def test_ngram_drafts_are_accepted_on_a_copying_task(engines: tuple[LLM, LLM]) -> None:
    _, spec = engines
    sched = spec.engine.scheduler
    before = sched.num_accepted_tokens_total, sched.num_draft_tokens_total
    out = spec.generate(_prompts(spec)[-1:], SamplingParams(temperature=0.0, max_tokens=40))[0]
    accepted = sched.num_accepted_tokens_total - before[0]
    drafted = sched.num_draft_tokens_total - before[1]
    assert out.text.startswith("The quick brown fox jumps over the lazy dog.")
    # the reply copies the prompt: nearly every draft is accepted (30 of 31 when measured)
    assert accepted >= 20 and accepted / drafted > 0.6, (accepted, drafted, out.text)
