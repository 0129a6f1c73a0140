"""Bad input is a clear error naming the culprit, and the engine keeps serving the others."""

from __future__ import annotations

import json

import pytest

from engine import LLM, SamplingParams
from engine.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny-random", device="cpu", show_progress=False, max_model_len=256)


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10})
    )
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        LLM(str(tmp_path), device="cpu", show_progress=False)


def test_missing_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path), device="cpu", show_progress=False)


def test_missing_weights(tmp_path, llm):
    from engine.demo_model import ensure_tiny_random_model

    (tmp_path / "config.json").write_text((ensure_tiny_random_model() / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="safetensors"):
        LLM(str(tmp_path), device="cpu", show_progress=False)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([5] * 300, SamplingParams(max_tokens=1), "prompt"),
        ([5] * 100, SamplingParams(max_tokens=200), "max_tokens"),
        ([5, 10**6], SamplingParams(), "prompt_token_ids"),
        ([5, -1], SamplingParams(), "prompt_token_ids"),
        ([], SamplingParams(), "prompt_token_ids"),
        ("", SamplingParams(), "prompt"),
        ([5], SamplingParams(top_k=10**7), "top_k"),
        ([5], SamplingParams(stop_token_ids=[10**7]), "stop_token_ids"),
    ],
)
def test_invalid_request_names_field_and_engine_keeps_serving(llm, prompt, params, field):
    engine = llm.engine
    engine.add_request("good", [7, 8, 9], SamplingParams(temperature=0, max_tokens=4))
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", prompt, params)
    assert err.value.field == field
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["good"]
    assert engine.stats().num_free_blocks == engine.stats().num_usable_blocks


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 1000}, "n"),
        ({"logprobs": 1000}, "logprobs"),
        ({"stop": ["x" * 2**20]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field


def test_generate_validates_every_prompt_before_running_any(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([[5, 6], [5, 10**6]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()


def test_stop_strings_abort_and_finish_reasons(llm):
    engine = llm.engine
    free = engine.stats().num_free_blocks
    out = llm.generate(["Hello world"], SamplingParams(temperature=0, max_tokens=24))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 24
    stop = out.text[3:6]
    if stop:
        stopped = llm.generate(
            ["Hello world"], SamplingParams(temperature=0, max_tokens=24, stop=[stop])
        )[0]
        assert stopped.finish_reason == "stop" and stop not in stopped.text
        assert out.text.startswith(stopped.text)
    engine.add_request("x", [5] * 40, SamplingParams(max_tokens=50))
    engine.step()
    assert engine.stats().num_free_blocks < free
    engine.abort(["x"])
    assert engine.stats().num_free_blocks == free and not engine.has_unfinished()


def test_seeded_sampling_reproducible_across_batches(llm):
    p = SamplingParams(temperature=1.0, top_k=50, seed=42, max_tokens=12)
    alone = llm.generate([[11, 12, 13]], p)[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=i, max_tokens=12) for i in range(5)]
    batch = llm.generate(
        [[20, 21]] * 2 + [[11, 12, 13]] + [[30]] * 3, others[:2] + [p] + others[2:5]
    )
    assert batch[2].token_ids == alone
