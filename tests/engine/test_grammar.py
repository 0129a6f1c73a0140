"""Unit tests of engine.sampling.grammar (no model): the synchronous check, the compiler's cache
and background compilation, and a GrammarState reconstructed from tokens (the decode worker's
and the recomputed request's case) equal to one that saw every token as it came."""

from __future__ import annotations

import json
import threading

import pytest
import torch
import xgrammar as xgr

from engine.errors import InvalidRequestError
from engine.sampling.grammar import (
    GrammarCompiler,
    GrammarState,
    GrammarStatus,
    check_structured,
    clean_message,
    wait_any,
)
from engine.sampling_params import StructuredOutput

EOS = 0
# Token 0 is EOS; then every printable ASCII byte; then a few multi-byte pieces.
VOCAB = [b"</s>"] + [bytes([b]) for b in range(32, 127)] + [b'{"', b'": ', b'", "', b'"}', b"true"]
TOKEN = {piece: i for i, piece in enumerate(VOCAB)}
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "string", "maxLength": 4}, "b": {"type": "boolean"}},
    "required": ["a", "b"],
}
JSON_SCHEMA = StructuredOutput("json_schema", json.dumps(SCHEMA))
# '{"a": "xy", "b": true}' then EOS, in the vocabulary's pieces
TOKENS = [
    TOKEN[p] for p in (b'{"', b"a", b'": ', b'"', b"x", b"y", b'", "', b"b", b'": ', b"true", b"}")
]


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    c = GrammarCompiler.from_vocab(VOCAB, len(VOCAB), [EOS])
    yield c
    c.shutdown()


def ready_state(compiler: GrammarCompiler, structured: StructuredOutput) -> GrammarState:
    state = compiler.state(structured)
    while state.status is GrammarStatus.PENDING:
        wait_any([state], 1.0)
    assert state.status is GrammarStatus.READY, state.error
    return state


def mask_of(state: GrammarState) -> torch.Tensor:
    bitmask = xgr.allocate_token_bitmask(1, len(VOCAB))
    if state.terminated:
        state.fill_stop_only(bitmask, 0)
    else:
        state.matcher.fill_next_token_bitmask(bitmask, 0)
    return bitmask[0].clone()


def allowed(mask: torch.Tensor) -> set[int]:
    return {i for i in range(len(VOCAB)) if (int(mask[i // 32]) >> (i % 32)) & 1}


@pytest.mark.parametrize(
    "structured",
    [
        StructuredOutput("json_schema", '{"type": "object", "properties": 3}'),
        StructuredOutput("json_schema", "{not json"),
        StructuredOutput("regex", "(ab"),
        StructuredOutput("ebnf", 'root ::= "a" | undefined_rule'),
        StructuredOutput("ebnf", 'start ::= "a"'),
    ],
)
def test_check_refuses_bad_specs_naming_structured(structured: StructuredOutput) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_structured(structured)
    assert info.value.field == "structured"
    assert "\n" not in info.value.message and ".cc:" not in info.value.message
    assert info.value.message.startswith(f"invalid {structured.kind}: ")


@pytest.mark.parametrize(
    "structured",
    [
        JSON_SCHEMA,
        StructuredOutput("json_object"),
        StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}"),
        StructuredOutput("ebnf", 'root ::= "yes" | "no"'),
    ],
)
def test_check_accepts_good_specs(structured: StructuredOutput) -> None:
    check_structured(structured)


def test_clean_message_drops_the_source_location() -> None:
    raw = "[16:08:31] /project/cpp/regex_converter.cc:94: Regex parsing error at position 2:\n x"
    assert clean_message(raw) == "Regex parsing error at position 2: x"
    assert len(clean_message("y" * 1000)) == 300


def test_compiled_grammars_are_cached_by_kind_and_spec() -> None:
    c = GrammarCompiler.from_vocab(VOCAB, len(VOCAB), [EOS])
    c.cache_size = 2
    try:
        first = c.compile(JSON_SCHEMA)
        assert c.compile(StructuredOutput("json_schema", json.dumps(SCHEMA))) is first
        c.compile(StructuredOutput("regex", "a+"))
        c.compile(StructuredOutput("regex", "b+"))  # evicts the least recent: the schema
        assert c.num_cached == 2 and c.compile(JSON_SCHEMA) is not first
    finally:
        c.shutdown()


def test_the_grammar_compiles_off_the_calling_thread() -> None:
    release = threading.Event()
    threads: list[str] = []

    def make() -> xgr.TokenizerInfo:
        threads.append(threading.current_thread().name)
        release.wait(10)
        return xgr.TokenizerInfo(VOCAB, xgr.VocabType.RAW, stop_token_ids=[EOS])

    c = GrammarCompiler(make)
    try:
        state = c.state(JSON_SCHEMA)
        assert state.status is GrammarStatus.PENDING and not state.ready
        release.set()
        wait_any([state], 10)
        assert state.ready and threads[0].startswith("grammar-compile")
    finally:
        c.shutdown()


def test_a_compile_failure_fails_the_state_with_a_message() -> None:
    def make() -> xgr.TokenizerInfo:
        raise RuntimeError("the vocabulary is gone")

    c = GrammarCompiler(make)
    try:
        state = c.state(JSON_SCHEMA)
        wait_any([state], 10)
        assert state.status is GrammarStatus.FAILED
        assert state.error is not None and "the vocabulary is gone" in state.error
        assert not state.catch_up([1])
    finally:
        c.shutdown()


def test_catch_up_replay_equals_a_matcher_that_saw_every_token(compiler: GrammarCompiler) -> None:
    """A state built at any point from the tokens so far (a decode worker starts from the
    prompt and the first token; a recomputed request from all its outputs) masks as the state
    that accepted each token as it was sampled."""
    live = ready_state(compiler, JSON_SCHEMA)
    for n in range(len(TOKENS) + 1):
        assert live.catch_up(TOKENS[:n]) and live.num_accepted == n
        replayed = ready_state(compiler, JSON_SCHEMA)
        assert replayed.catch_up(TOKENS[:n])
        assert torch.equal(mask_of(replayed), mask_of(live)), f"after {n} tokens"
        if n < len(TOKENS):
            assert TOKENS[n] in allowed(mask_of(live))
    assert allowed(mask_of(live)) == {EOS}  # complete: only the stop token


def test_after_termination_only_stop_tokens_follow(compiler: GrammarCompiler) -> None:
    state = ready_state(compiler, JSON_SCHEMA)
    assert state.catch_up(TOKENS + [EOS]) and state.terminated
    assert allowed(mask_of(state)) == {EOS}
    assert state.catch_up(TOKENS + [EOS, EOS, EOS]) and state.num_accepted == len(TOKENS) + 3


def test_a_token_that_breaks_the_grammar_fails_the_state(compiler: GrammarCompiler) -> None:
    state = ready_state(compiler, JSON_SCHEMA)
    assert not state.catch_up([TOKEN[b"x"]])
    assert state.status is GrammarStatus.FAILED and state.error is not None
    assert "breaks the grammar" in state.error


def test_free_is_idempotent_and_final(compiler: GrammarCompiler) -> None:
    pending = compiler.state(StructuredOutput("regex", "[a-c]{3}z"))
    pending.free()
    pending.free()
    assert pending.status is GrammarStatus.FREED and not pending.catch_up([1])
    ready = ready_state(compiler, JSON_SCHEMA)
    ready.free()
    assert ready.status is GrammarStatus.FREED and not ready.ready
