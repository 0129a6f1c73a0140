"""Tests of engine.sampling_params.SamplingParams: validation names the field, extremes pass,
lists become tuples, the object is frozen and hashable, check_vocab checks model-dependent ids."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from engine.errors import InvalidRequestError
from engine.sampling_params import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    SamplingParams,
)

INVALID: list[tuple[str, dict[str, Any]]] = [
    ("n", {"n": 0}),
    ("n", {"n": MAX_N + 1}),
    ("n", {"n": 1.0}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": MAX_TEMPERATURE + 1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": True}),
    ("temperature", {"temperature": "1.0"}),
    ("top_k", {"top_k": -1}),
    ("top_k", {"top_k": 2.0}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.0001}),
    ("top_p", {"top_p": math.nan}),
    ("min_p", {"min_p": -0.01}),
    ("min_p", {"min_p": 1.01}),
    ("min_p", {"min_p": math.inf}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": 10.01}),
    ("repetition_penalty", {"repetition_penalty": math.nan}),
    ("presence_penalty", {"presence_penalty": -2.01}),
    ("presence_penalty", {"presence_penalty": 2.01}),
    ("presence_penalty", {"presence_penalty": math.inf}),
    ("frequency_penalty", {"frequency_penalty": -2.01}),
    ("frequency_penalty", {"frequency_penalty": 2.01}),
    ("frequency_penalty", {"frequency_penalty": math.nan}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": 1.0}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -5}),
    ("max_tokens", {"max_tokens": 2.0}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 17, "max_tokens": 16}),
    ("stop", {"stop": ["x"] * (MAX_STOP_STRINGS + 1)}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["a" * (MAX_STOP_STRING_CHARS + 1)]}),
    ("stop", {"stop": [3]}),
    ("stop_token_ids", {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": ["7"]}),
    ("logprobs", {"logprobs": -1}),
    ("logprobs", {"logprobs": MAX_LOGPROBS + 1}),
    ("logprobs", {"logprobs": 1.0}),
]


@pytest.mark.parametrize(
    ("field", "kwargs"), INVALID, ids=[f"{f}={list(k.values())[0]!r:.20}" for f, k in INVALID]
)
def test_invalid_field_raises_naming_it(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert isinstance(info.value, ValueError)


VALID_EXTREMES: list[dict[str, Any]] = [
    {"n": 1},
    {"n": MAX_N},
    {"temperature": 0.0},
    {"temperature": MAX_TEMPERATURE},
    {"temperature": 1},  # an int is a number
    {"top_k": 0},
    {"top_k": 10**9},
    {"top_p": 1.0},
    {"top_p": 1e-9},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"repetition_penalty": 1e-6},
    {"repetition_penalty": 10.0},
    {"presence_penalty": -2.0, "frequency_penalty": 2.0},
    {"presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"seed": 0},
    {"seed": 2**63 - 1},
    {"max_tokens": 1, "min_tokens": 1},
    {"max_tokens": None, "min_tokens": 10**6},
    {"stop": ["a" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS},
    {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS))},
    {"logprobs": 0},
    {"logprobs": MAX_LOGPROBS},
]


@pytest.mark.parametrize("kwargs", VALID_EXTREMES, ids=[repr(k)[:40] for k in VALID_EXTREMES])
def test_valid_extremes_are_accepted(kwargs: dict[str, Any]) -> None:
    params = SamplingParams(**kwargs)
    for name, value in kwargs.items():
        got = getattr(params, name)
        assert got == (tuple(value) if isinstance(value, list) else value)


def test_defaults_are_valid_and_not_greedy() -> None:
    params = SamplingParams()
    assert not params.greedy
    assert SamplingParams(temperature=0.0).greedy


def test_lists_become_tuples_and_object_is_hashable() -> None:
    params = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4])  # type: ignore[arg-type]
    assert params.stop == ("a", "b")
    assert params.stop_token_ids == (3, 4)
    assert hash(params) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)))


def test_single_stop_string_becomes_one_element_tuple() -> None:
    assert SamplingParams(stop="END").stop == ("END",)  # type: ignore[arg-type]


def test_frozen() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]


def test_check_vocab_accepts_in_range() -> None:
    SamplingParams(top_k=100, stop_token_ids=(0, 99)).check_vocab(100)
    SamplingParams().check_vocab(1)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("top_k", {"top_k": 101}), ("stop_token_ids", {"stop_token_ids": [5, 100]})],
)
def test_check_vocab_rejects_out_of_range(field: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs).check_vocab(100)
    assert info.value.field == field
