"""Structured output and logit_bias through `engine.LLM` on CPU, on the real chat model
(SmolLM2-135M-Instruct) and on the tiny random model: outputs follow their JSON schema, JSON
object, regex or EBNF grammar, greedy and sampled, beside free rows that are unchanged; bad
grammars are refused naming "structured"; every exit frees the grammar state; a request whose
grammar compiles slowly or fails does not hold up the others. Skipped without the demo extra."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator

import jsonschema
import pytest

from tests.real_model import skip_without_model

skip_without_model()
pytestmark = pytest.mark.timeout(600)

from engine import LLM, SamplingParams  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.outputs import RequestOutput  # noqa: E402
from engine.sampling.grammar import GrammarCompiler, GrammarStatus  # noqa: E402
from engine.sampling_params import StructuredOutput  # noqa: E402
from engine.tokenizer import apply_chat_template  # noqa: E402

SCHEMAS: dict[str, tuple[dict, str]] = {
    "nested": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 20},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["city", "zip"],
                },
            },
            "required": ["name", "address"],
        },
        "Give a person's name and address as JSON.",
    ),
    "array": (
        {
            "type": "object",
            "properties": {
                "colors": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 1,
                    "maxItems": 3,
                }
            },
            "required": ["colors"],
        },
        "Name three primary colors as JSON.",
    ),
    "enum": (
        {
            "type": "object",
            "properties": {
                "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
            },
            "required": ["answer", "confidence"],
        },
        "Is the sky blue? Answer as JSON.",
    ),
    "array_of_objects": (
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "task": {"type": "string", "maxLength": 15},
                    "done": {"type": "boolean"},
                },
                "required": ["task", "done"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "List two chores as JSON.",
    ),
}
DATE = r"\d{4}-\d{2}-\d{2}"
EBNF = 'root ::= "The answer is " ("yes" | "no") "."'
FREE_PROMPTS = ["What is 12 times 7?", "Name three primary colors."]
MODES = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 0.8, "seed": 7}}
MAX_TOKENS = 96


def schema_of(name: str) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(SCHEMAS[name][0]))


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    with LLM("demo", device="cpu", dtype="float32", show_progress=False, max_model_len=1024) as m:
        yield m


def chat(llm: LLM, text: str) -> list[int]:
    return apply_chat_template(llm.tokenizer, [{"role": "user", "content": text}])


def rows() -> dict[str, tuple[str, SamplingParams]]:
    """name -> (prompt, params): every grammar kind, greedy and sampled, and two free rows."""
    table: dict[str, tuple[str, SamplingParams]] = {}
    for mode, kw in MODES.items():
        for name, (_, prompt) in SCHEMAS.items():
            table[f"{name}-{mode}"] = (
                prompt,
                SamplingParams(max_tokens=MAX_TOKENS, structured=schema_of(name), **kw),
            )
        object_output = StructuredOutput("json_object")
        table[f"object-{mode}"] = (
            "Describe a cat as a JSON object.",
            SamplingParams(max_tokens=160, structured=object_output, **kw),
        )
        table[f"date-{mode}"] = (
            "When was the Eiffel tower finished? Give the date.",
            SamplingParams(max_tokens=MAX_TOKENS, structured=StructuredOutput("regex", DATE), **kw),
        )
        table[f"ebnf-{mode}"] = (
            "Is water wet?",
            SamplingParams(max_tokens=MAX_TOKENS, structured=StructuredOutput("ebnf", EBNF), **kw),
        )
    for i, prompt in enumerate(FREE_PROMPTS):
        table[f"free-{i}"] = (prompt, SamplingParams(temperature=0.0, max_tokens=24))
    return table


@pytest.fixture(scope="module")
def batch(llm: LLM) -> dict[str, RequestOutput]:
    """One generate call: grammar rows of every kind mixed with free rows."""
    table = rows()
    prompts = [chat(llm, prompt) for prompt, _ in table.values()]
    outputs = llm.generate(prompts, [params for _, params in table.values()])
    assert llm.engine.structured.num_live == 0
    return dict(zip(table, outputs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_output_parses_and_validates(
    batch: dict[str, RequestOutput], name: str, mode: str
) -> None:
    out = batch[f"{name}-{mode}"]
    assert out.finish_reason == "stop", out.text
    jsonschema.validate(json.loads(out.text), SCHEMAS[name][0])


@pytest.mark.parametrize("mode", MODES)
def test_json_object_output_is_an_object(batch: dict[str, RequestOutput], mode: str) -> None:
    out = batch[f"object-{mode}"]
    assert out.finish_reason == "stop", out.text
    assert isinstance(json.loads(out.text), dict)


@pytest.mark.parametrize("mode", MODES)
def test_regex_output_fully_matches(batch: dict[str, RequestOutput], mode: str) -> None:
    out = batch[f"date-{mode}"]
    assert out.finish_reason == "stop" and re.fullmatch(DATE, out.text), out.text


@pytest.mark.parametrize("mode", MODES)
def test_ebnf_output_is_in_its_language(batch: dict[str, RequestOutput], mode: str) -> None:
    out = batch[f"ebnf-{mode}"]
    assert out.finish_reason == "stop"
    assert out.text in ("The answer is yes.", "The answer is no.")


def test_free_rows_beside_grammar_rows_equal_their_output_alone(
    llm: LLM, batch: dict[str, RequestOutput]
) -> None:
    alone = llm.generate(
        [chat(llm, p) for p in FREE_PROMPTS], SamplingParams(temperature=0.0, max_tokens=24)
    )
    for i, out in enumerate(alone):
        assert batch[f"free-{i}"].token_ids == out.token_ids


@pytest.mark.parametrize(
    "structured",
    [
        StructuredOutput("json_schema", '{"type": "object", "properties": 3}'),
        StructuredOutput("json_schema", '{"type": "strnig"}'),
        StructuredOutput("regex", "(unclosed"),
        StructuredOutput("ebnf", 'root ::= "a" | missing'),
    ],
)
def test_a_bad_grammar_is_refused_naming_structured(llm: LLM, structured: StructuredOutput) -> None:
    with pytest.raises(InvalidRequestError) as info:
        llm.generate([chat(llm, "Hi")], SamplingParams(structured=structured))
    assert info.value.field == "structured" and "\n" not in info.value.message
    with pytest.raises(InvalidRequestError, match="^structured: "):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured=structured))
    assert not llm.engine.has_unfinished() and llm.engine.structured.num_live == 0


def first_tokens(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return llm.generate([prompt], params)[0].token_ids


def test_logit_bias_bans_and_forces_tokens(llm: LLM) -> None:
    prompt = chat(llm, "What is the capital of France?")
    plain = first_tokens(llm, prompt, SamplingParams(temperature=0.0, max_tokens=2))
    banned = first_tokens(
        llm, prompt, SamplingParams(temperature=0.0, max_tokens=2, logit_bias={plain[0]: -100.0})
    )
    assert banned[0] != plain[0]
    forced_id = llm.tokenizer.encode(" banana")[0]
    forced = first_tokens(
        llm,
        prompt,
        SamplingParams(temperature=0.8, seed=1, max_tokens=2, logit_bias={forced_id: 100}),
    )
    assert forced[0] == forced_id


# ------------------------------------------------------------------ the engine's grammar states


def run_until_done(
    engine: LLMEngine, ids: set[str], max_steps: int = 400
) -> dict[str, RequestOutput]:
    finished: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if ids <= finished.keys():
            return finished
    raise AssertionError(f"not finished after {max_steps} steps: {ids - finished.keys()}")


def structured_params(**kw: object) -> SamplingParams:
    return SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, structured=schema_of("enum"), **kw
    )  # type: ignore[arg-type]


def test_grammar_state_is_freed_on_every_exit(llm: LLM) -> None:
    engine = llm.engine
    prompt = chat(llm, SCHEMAS["enum"][1])
    finished = engine.add_request("finish", prompt, structured_params())
    aborted = engine.add_request("abort", prompt, structured_params())
    stopped = engine.add_request("stop-string", prompt, structured_params(stop=['"answer"']))
    engine.step()
    engine.abort(["abort"])
    outs = run_until_done(engine, {"finish", "stop-string"})
    assert outs["finish"].finish_reason == "stop" and outs["stop-string"].text == "{"
    for request in (finished, aborted, stopped):
        assert request.grammar is not None and request.grammar.status is GrammarStatus.FREED
    dropped = engine.add_prefilled("dropped", prompt, None, structured_params())
    assert dropped is not None and dropped.grammar is not None
    engine.release_blocks(engine.drop_prefilled(dropped))
    assert dropped.grammar.status is GrammarStatus.FREED
    assert engine.structured.num_live == 0 and not engine.has_unfinished()


def test_decode_side_request_catches_up_from_its_first_token(llm: LLM) -> None:
    """As on a decode worker: the request arrives with its prompt and the first token the
    prefill worker sampled; its matcher replays that token before constraining the next. (The
    prompt's KV is not computed here: the model's choices are poor, the grammar still holds.)"""
    engine = llm.engine
    prompt = chat(llm, SCHEMAS["nested"][1])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, structured=schema_of("nested"))
    first = llm.generate([prompt], params)[0].token_ids[0]
    first_text = llm.tokenizer.decode([first])
    assert first_text.startswith("{")
    request = engine.add_prefilled("decode-side", prompt, first, params, first_text=first_text)
    assert request is not None
    engine.activate_prefilled(request)
    out = run_until_done(engine, {"decode-side"})["decode-side"]
    assert out.finish_reason == "stop" and out.text.startswith(first_text)
    jsonschema.validate(json.loads(out.text), SCHEMAS["nested"][0])


def test_a_compiling_grammar_holds_up_nobody_and_a_failed_one_ends_with_an_error(
    llm: LLM,
) -> None:
    engine = llm.engine
    release = threading.Event()

    def slow_info():  # type: ignore[no-untyped-def]
        release.wait(30)
        import xgrammar as xgr

        return xgr.TokenizerInfo.from_huggingface(llm.tokenizer, vocab_size=engine.vocab_size)

    def broken_info():  # type: ignore[no-untyped-def]
        raise RuntimeError("no vocabulary today")

    original = engine.structured.compiler
    slow, broken = GrammarCompiler(slow_info), GrammarCompiler(broken_info)
    try:
        prompt = chat(llm, SCHEMAS["enum"][1])
        engine.structured.compiler = slow
        waiting = engine.add_request("compiling", prompt, structured_params())
        engine.structured.compiler = broken
        engine.add_request("failing", prompt, structured_params())
        engine.structured.compiler = original
        engine.add_request("free", prompt, SamplingParams(temperature=0.0, max_tokens=4))
        outs = run_until_done(engine, {"free", "failing"})
        assert outs["failing"].finish_reason == "abort" and outs["failing"].token_ids == []
        assert outs["failing"].error is not None and "no vocabulary today" in outs["failing"].error
        assert waiting.num_output_tokens == 0 and not waiting.block_ids
        release.set()
        done = run_until_done(engine, {"compiling"})["compiling"]
        jsonschema.validate(json.loads(done.text), SCHEMAS["enum"][0])
    finally:
        release.set()
        engine.structured.compiler = original
        slow.shutdown()
        broken.shutdown()
    assert engine.structured.num_live == 0 and not engine.has_unfinished()


def test_a_token_that_breaks_the_grammar_ends_the_request_with_an_error(llm: LLM) -> None:
    """min_tokens bans EOS where the complete grammar allows nothing else: the forced token
    breaks the grammar, and the request ends (abort) saying so."""
    params = SamplingParams(
        temperature=0.0, max_tokens=8, min_tokens=4, structured=StructuredOutput("regex", "yes")
    )
    out = llm.generate([chat(llm, "Say yes.")], params)[0]
    assert out.finish_reason == "abort" and out.text.startswith("yes")
    assert out.error is not None and "breaks the grammar" in out.error
    assert llm.engine.structured.num_live == 0


def test_no_tokenizer_no_structured_output() -> None:
    with LLM("preset:tiny", load_format="dummy", device="cpu", show_progress=False) as dummy:
        with pytest.raises(InvalidRequestError, match="has no tokenizer"):
            dummy.generate([[1, 2, 3]], SamplingParams(structured=StructuredOutput("json_object")))


# ------------------------------------------------------------------------- random weights


def test_random_weights_still_produce_valid_json() -> None:
    """The tiny random model's choices are noise: only the mask makes its output JSON.
    (Strings bounded by patterns, not maxLength: xgrammar 0.2.9 lets control characters into
    maxLength strings, which strict JSON forbids.)"""
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,10}$"},
            "note": {"type": "string", "pattern": "^[A-Za-z0-9 ,.]{0,24}$"},
            "n": {"type": "integer", "minimum": 0, "maximum": 999},
            "ok": {"type": "boolean"},
            "tags": {
                "type": "array",
                "items": {"type": "string", "enum": ["x", "y"]},
                "maxItems": 3,
            },
        },
        "required": ["name", "note", "n", "ok", "tags"],
    }
    structured = StructuredOutput("json_schema", json.dumps(schema))
    params = [SamplingParams(temperature=0.0, max_tokens=200, structured=structured)] + [
        SamplingParams(temperature=1.0, seed=seed, max_tokens=200, structured=structured)
        for seed in range(4)
    ]
    with LLM("tiny-random", device="cpu", show_progress=False, max_model_len=512) as tiny:
        outs = tiny.generate(["hello world"] * len(params), params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
