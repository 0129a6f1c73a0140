"""Validation of a tandem.v1 GenerateRequest into the router's plain `GenerateRequest`, before
anything is allocated or sent to a worker: the gRPC front door's half of the request contract.

Every check raises `engine.errors.InvalidRequestError` whose `field` names the request field
(`text`, `token_ids`, `chat`, `request_id`, `sampling.<name>`, `ttft_ms`, `priority`, ...);
`validate` turns it into a `RequestError` of kind INVALID_ARGUMENT with that field (the server
answers "field: message"). Cheap structural checks run first, then tokenization, then the
checks that need the prompt length and the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.errors import InvalidRequestError, check_request
from engine.sampling_params import SamplingParams, StructuredOutput
from router.errors import RequestError
from router.request import GenerateRequest
from router.slo import DEFAULT_CLASS, SloClass, resolve_slo
from router.tokenizer import ChatTurn, Tokenizer
from tandem.api import generation_pb2 as pb

MAX_REQUEST_ID_CHARS = 128
MAX_PRIORITY = 1000
MAX_CHAT_MESSAGES = 1024
MAX_CHARS_PER_TOKEN = 64  # bounds tokenizer work before the prompt's token count is known
SAMPLING_CACHE_SIZE = 256  # distinct sampling messages kept built (`sampling_from_proto`)
SAMPLING_CACHE_MAX_BYTES = 1024  # larger ones (a long grammar) are built every time
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:\-]+$")
_SCALAR_FIELDS = (
    "n",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "logprobs",
    "skip_special_tokens",
    "include_stop_str_in_output",
)


@dataclass(frozen=True)
class ModelLimits:
    max_model_len: int
    vocab_size: int


def _check_request_id(req: pb.GenerateRequest) -> None:
    if req.HasField("request_id"):
        check_request_id(req.request_id)


def check_request_id(rid: str, field: str = "request_id") -> None:
    check_request(
        0 < len(rid) <= MAX_REQUEST_ID_CHARS,
        field,
        f"must be 1..{MAX_REQUEST_ID_CHARS} characters",
    )
    check_request(
        _REQUEST_ID.match(rid) is not None,
        field,
        "may hold only letters, digits and _ . : -",
    )


_SAMPLING_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def wire_field(engine_field: str) -> str:
    """The wire name of a field an engine (a worker) refused: `sampling.<name>` for a sampling
    parameter (e.g. a grammar xgrammar rejects: `sampling.structured`), else as is."""
    return f"sampling.{engine_field}" if engine_field in _SAMPLING_FIELDS else engine_field


def _check_json_schema(text: str) -> None:
    """The pre-check that needs no xgrammar: the text is a JSON object and, where `jsonschema`
    is installed, a valid schema under its meta-schema. Regex and EBNF syntax are left to the
    worker's synchronous check (xgrammar's syntax is not Python's `re`)."""
    field = "sampling.structured"
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(field, f"json_schema is not JSON: {exc}") from None
    check_request(isinstance(schema, dict), field, "json_schema must be a JSON object")
    try:
        import jsonschema
    except ImportError:  # optional here; the worker checks the schema with xgrammar anyway
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequestError(
            field, f"json_schema is not a valid schema: {exc.message}"
        ) from None


def structured_from_proto(msg: pb.StructuredOutput) -> StructuredOutput:
    """A StructuredOutput from the wire; errors name `sampling.structured`."""
    field = "sampling.structured"
    kind = msg.WhichOneof("kind")
    check_request(kind is not None, field, "set one of json_schema, json_object, regex, ebnf")
    assert kind is not None
    if kind == "json_object":
        check_request(msg.json_object, field, "json_object must be true when set")
        return StructuredOutput("json_object")
    try:
        structured = StructuredOutput(kind, getattr(msg, kind))
    except InvalidRequestError as exc:
        raise InvalidRequestError(field, exc.message) from None
    if kind == "json_schema":
        _check_json_schema(structured.spec)
    return structured


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """SamplingParams from the wire; errors name `sampling.<field>`.

    Most clients send the same sampling settings with every request, and building and
    checking them is most of a request's validation (about 25 us): a message of at most
    `SAMPLING_CACHE_MAX_BYTES` is built once per distinct encoding (an LRU of
    `SAMPLING_CACHE_SIZE`). SamplingParams is frozen, so requests may share one; a refusal
    raises every time (never cached)."""
    key = msg.SerializeToString(deterministic=True)
    if len(key) > SAMPLING_CACHE_MAX_BYTES:
        return _build_sampling(msg)
    return _cached_sampling(key)


@functools.lru_cache(maxsize=SAMPLING_CACHE_SIZE)
def _cached_sampling(key: bytes) -> SamplingParams:
    return _build_sampling(pb.SamplingParams.FromString(key))


def _build_sampling(msg: pb.SamplingParams) -> SamplingParams:
    kwargs: dict[str, object] = {f: getattr(msg, f) for f in _SCALAR_FIELDS if msg.HasField(f)}
    kwargs["stop"] = tuple(msg.stop)
    kwargs["stop_token_ids"] = tuple(msg.stop_token_ids)
    kwargs["logit_bias"] = tuple(sorted(msg.logit_bias.items()))
    if msg.HasField("structured"):
        kwargs["structured"] = structured_from_proto(msg.structured)
    try:
        params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None
    check_request(
        params.n == 1, "sampling.n", "the router streams one sequence per request: n must be 1"
    )
    return params


def _check_prompt_shape(req: pb.GenerateRequest, limits: ModelLimits) -> None:
    kind = req.WhichOneof("prompt")
    check_request(kind is not None, "prompt", "missing: set one of text, token_ids, chat")
    max_chars = limits.max_model_len * MAX_CHARS_PER_TOKEN
    if kind == "text":
        check_request(len(req.text) > 0, "text", "the prompt is empty")
        check_request(
            len(req.text) <= max_chars, "text", f"{len(req.text)} characters; at most {max_chars}"
        )
    elif kind == "token_ids":
        check_token_ids(req.token_ids.ids, limits, "token_ids")
    else:
        msgs = req.chat.messages
        check_request(
            0 < len(msgs) <= MAX_CHAT_MESSAGES, "chat", f"needs 1..{MAX_CHAT_MESSAGES} messages"
        )
        check_request(all(m.role for m in msgs), "chat", "every message needs a role")
        num_chars = sum(len(m.content) + len(m.role) for m in msgs)
        check_request(
            num_chars <= max_chars, "chat", f"{num_chars} characters; at most {max_chars}"
        )


def check_token_ids(ids: Sequence[int], limits: ModelLimits, field: str) -> None:
    """A prompt given as token ids: not empty, shorter than the context, in the vocabulary."""
    check_request(len(ids) > 0, field, "the prompt is empty")
    check_request(
        len(ids) < limits.max_model_len,
        field,
        f"{len(ids)} tokens; the context is {limits.max_model_len}",
    )
    bad = next((t for t in ids if not 0 <= t < limits.vocab_size), None)
    check_request(
        bad is None, field, f"id {bad} is outside the vocabulary [0, {limits.vocab_size})"
    )


def check_priority(priority: int | None, field: str = "priority") -> None:
    check_request(
        priority is None or abs(priority) <= MAX_PRIORITY,
        field,
        f"must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}]",
    )


def _tokenize(req: pb.GenerateRequest, tokenizer: Tokenizer) -> list[int]:
    kind = req.WhichOneof("prompt")
    if kind == "token_ids":
        return list(req.token_ids.ids)
    if kind == "text":
        ids = tokenizer.encode(req.text)
    else:
        turns = [ChatTurn(m.role, m.content) for m in req.chat.messages]
        add = req.chat.add_generation_prompt if req.chat.HasField("add_generation_prompt") else True
        ids = tokenizer.encode_chat(turns, add)
    check_request(len(ids) > 0, str(kind), "the prompt tokenizes to nothing")
    return ids


def cap_max_tokens(
    params: SamplingParams,
    explicit: bool,
    num_prompt: int,
    limits: ModelLimits,
    field: str = "sampling.max_tokens",
    prompt_field: str = "prompt",
) -> SamplingParams:
    """max_tokens set to the room the prompt leaves when unset, or when it was a default larger
    than that room; an explicit max_tokens that does not fit is refused naming `field`."""
    room = limits.max_model_len - num_prompt
    check_request(
        room >= 1,
        prompt_field,
        f"{num_prompt} tokens leave no room in the {limits.max_model_len}-token context",
    )
    if params.max_tokens is None or (not explicit and params.max_tokens > room):
        return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))
    check_request(
        params.max_tokens <= room,
        field,
        f"{params.max_tokens} exceeds the {room} tokens left in the context",
    )
    return params


def validate(
    req: pb.GenerateRequest,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    slo_classes: Mapping[str, SloClass],
    deadline: float | None = None,
) -> GenerateRequest:
    """Check every field, tokenize, and resolve the SLO. `deadline`: the call's, UNIX seconds.

    Raises RequestError (INVALID_ARGUMENT, `field` set).
    """
    arrival = time.monotonic()
    try:
        return _validate(req, tokenizer, limits, slo_classes, arrival, deadline)
    except InvalidRequestError as exc:
        raise RequestError.invalid(exc) from None


def _validate(
    req: pb.GenerateRequest,
    tokenizer: Tokenizer,
    limits: ModelLimits,
    slo_classes: Mapping[str, SloClass],
    arrival: float,
    deadline: float | None,
) -> GenerateRequest:
    _check_request_id(req)
    _check_prompt_shape(req, limits)
    params = sampling_from_proto(req.sampling)
    priority = req.priority if req.HasField("priority") else None
    check_priority(priority)
    slo_class = req.slo_class if req.HasField("slo_class") else DEFAULT_CLASS
    slo = resolve_slo(
        slo_classes,
        slo_class=slo_class,
        ttft_ms=req.ttft_ms if req.HasField("ttft_ms") else None,
        tpot_ms=req.tpot_ms if req.HasField("tpot_ms") else None,
        priority=priority,
        best_effort=req.best_effort if req.HasField("best_effort") else None,
    )
    try:
        params.check_vocab(limits.vocab_size)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampling.{exc.field}", exc.message) from None
    prompt = _tokenize(req, tokenizer)
    params = cap_max_tokens(params, req.sampling.HasField("max_tokens"), len(prompt), limits)
    return GenerateRequest(
        request_id=req.request_id if req.HasField("request_id") else None,
        prompt_token_ids=tuple(prompt),
        sampling_params=params,
        slo=slo,
        slo_class=slo_class,
        arrival=arrival,
        deadline=deadline,
    )
