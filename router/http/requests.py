"""An OpenAI body (chat or completions) -> the router's plain `GenerateRequest`s, one per choice.

The router streams one sequence per request, so a body asking for `n` choices of each of its
prompts becomes `n x prompts` GenerateRequests served side by side (router/http/fanout.py):
choice `p * n + i` is the i-th sample of prompt p, with request id `<id>-<p * n + i>` when there
are several (`<id>` alone for one) and seed `seed + i` when a seed is given.

Every check is a public helper of router/validation.py, router/slo.py or SamplingParams (the
gRPC door runs the same ones); they raise `InvalidRequestError` naming the router's field, which
`prepare` turns into a 400 `ApiError` whose `param` is the body's name (`Renames`): e.g.
`max_tokens` -> `max_completion_tokens` when the body said that, `logprobs` -> `top_logprobs`
(chat), `structured` -> `response_format`, `ttft_ms` -> `x-tandem-ttft-ms` when it came from
the header. A model other than the served one is 404 naming `model`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from engine.errors import InvalidRequestError, check_request
from engine.sampling_params import SamplingParams, StructuredOutput
from router.config import RouterConfig
from router.http import schemas, tandem_fields
from router.http.chat_tools import ToolSetup, chat_turns, encode_chat, tool_setup, tool_structured
from router.http.errors import ApiError, invalid_fields
from router.http.structured import structured_output
from router.request import GenerateRequest
from router.slo import DEFAULT_CLASS, resolve_slo
from router.tokenizer import Tokenizer
from router.validation import (
    MAX_CHARS_PER_TOKEN,
    ModelLimits,
    cap_max_tokens,
    check_priority,
    check_request_id,
    check_token_ids,
)

MAX_CHOICES = 64  # n x prompts of one body
Renames = dict[str, str]


@dataclass(frozen=True)
class Model:
    """What the HTTP front door serves: the model's name, limits and tokenizer."""

    config: RouterConfig
    tokenizer: Tokenizer
    limits: ModelLimits

    @property
    def name(self) -> str:
        return self.config.model_name


@dataclass(frozen=True)
class Prepared:
    """A body's choices. `choices[k]` serves choice index k, of prompt `prompt_of[k]`;
    `prompts` are the prompts' token ids (for usage and echo); `renames` maps the router's field
    names to the body's for errors raised while serving; `tools` says how a chat's output
    becomes tool calls."""

    request_id: str
    created: int
    choices: tuple[GenerateRequest, ...]
    prompt_of: tuple[int, ...]
    prompts: tuple[tuple[int, ...], ...]
    deadline_mono: float | None
    renames: Mapping[str, str] = field(default_factory=dict)
    tools: ToolSetup = field(default_factory=ToolSetup)


def check_model(name: str | None, model: Model, required: bool = True) -> None:
    """404 naming `model` unless `name` is the served model (or absent and not `required`)."""
    if name is None and not required:
        return
    if name != model.name:
        raise ApiError(
            404,
            f"model: {str(name)[:128]!r} is not served here; this server serves {model.name!r}",
            param="model",
            code="model_not_found",
        )


def prepare(build: Callable[[Renames], Prepared], renames: Renames | None = None) -> Prepared:
    """Run `build`, turning an invalid field into a 400 naming the body's field. `build` may
    add to `renames` as it learns which names the body used."""
    names: Renames = {} if renames is None else renames
    with invalid_fields(names):
        return build(names)


def chat(body: schemas.ChatCompletionRequest, headers: Mapping[str, str], model: Model) -> Prepared:
    """A chat body's choices; a forced tool call's constraint (router/http/chat_tools.py)
    excludes `response_format`."""
    check_model(body.model, model)

    def build(renames: Renames) -> Prepared:
        max_field = (
            "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        )
        renames |= {"chat": "messages", "logprobs": "top_logprobs", "max_tokens": max_field}
        tools = tool_setup(body, model.tokenizer.chat_template)
        structured = _structured(body, tool_structured(tools), renames)
        num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        check_request(
            body.logprobs or body.top_logprobs is None, "top_logprobs", "needs logprobs: true"
        )
        max_tokens = (
            body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        )
        params = sampling_params(body, max_tokens, num_logprobs, structured)
        prompt = _chat_prompt(body, model)
        prepared = _choices(body, headers, model, params, [prompt], max_field, "messages", renames)
        return replace(prepared, tools=tools)

    return prepare(build)


def completion(
    body: schemas.CompletionRequest, headers: Mapping[str, str], model: Model
) -> Prepared:
    check_model(body.model, model)

    def build(renames: Renames) -> Prepared:
        renames |= {"text": "prompt", "token_ids": "prompt"}
        structured = _structured(body, None, renames)
        check_request(
            not (body.echo and body.logprobs is not None),
            "echo",
            "echo with logprobs is not supported (the prompt's logprobs are not computed)",
        )
        max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default
        params = sampling_params(body, max_tokens, body.logprobs, structured)
        prompts = [_completion_prompt(p, model) for p in _prompt_list(body.prompt)]
        explicit = body.max_tokens is not None
        return _choices(
            body, headers, model, params, prompts, "max_tokens", "prompt", renames, explicit
        )

    return prepare(build)


def _structured(
    body: schemas.SamplingFields, tool_structured: StructuredOutput | None, renames: Renames
) -> StructuredOutput | None:
    structured, param = structured_output(body)
    if tool_structured is not None:
        check_request(structured is None, "tool_choice", f"a forced tool call excludes {param}")
        structured, param = tool_structured, "tool_choice"
    renames["structured"] = param
    return structured


def sampling_params(
    body: schemas.SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    structured: StructuredOutput | None,
) -> SamplingParams:
    """SamplingParams from the body's fields (unset ones keep SamplingParams' defaults); raises
    InvalidRequestError naming SamplingParams' field (the body's, but for max_tokens, logprobs
    and structured)."""
    optional = (
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
    )
    kwargs: dict[str, Any] = {
        name: getattr(body, name) for name in optional if getattr(body, name) is not None
    }
    if body.top_k is not None:
        kwargs["top_k"] = 0 if body.top_k == -1 else body.top_k  # vLLM's -1: disabled
    stop = body.stop
    kwargs["stop"] = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)
    kwargs["stop_token_ids"] = tuple(body.stop_token_ids or ())
    kwargs["logit_bias"] = _logit_bias(body.logit_bias)
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured=structured, **kwargs)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"<token id>": bias} as SamplingParams' ((id, bias), ...)."""
    items = []
    for key, value in (bias or {}).items():
        try:
            token_id = int(key)
        except ValueError:
            raise InvalidRequestError("logit_bias", f"key {key[:32]!r} is not a token id") from None
        items.append((token_id, value))
    return tuple(items)


def _chat_prompt(body: schemas.ChatCompletionRequest, model: Model) -> tuple[int, ...]:
    max_chars = model.limits.max_model_len * MAX_CHARS_PER_TOKEN
    num_chars = sum(len(m.text()) + len(m.role) for m in body.messages)
    check_request(
        num_chars <= max_chars, "messages", f"{num_chars} characters; at most {max_chars}"
    )
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    ids = encode_chat(model.tokenizer, chat_turns(body.messages), body.add_generation_prompt, tools)
    check_request(len(ids) > 0, "messages", "the prompt tokenizes to nothing")
    return tuple(ids)


def _prompt_list(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of prompts (text or token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    check_request(len(prompt) > 0, "prompt", "the prompt is empty")
    if isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _completion_prompt(prompt: str | list[int], model: Model) -> tuple[int, ...]:
    if isinstance(prompt, str):
        max_chars = model.limits.max_model_len * MAX_CHARS_PER_TOKEN
        check_request(len(prompt) > 0, "prompt", "the prompt is empty")
        check_request(
            len(prompt) <= max_chars, "prompt", f"{len(prompt)} characters; at most {max_chars}"
        )
        ids = model.tokenizer.encode(prompt)
        check_request(len(ids) > 0, "prompt", "the prompt tokenizes to nothing")
        return tuple(ids)
    check_token_ids(prompt, model.limits, "prompt")
    return tuple(prompt)


def _choices(
    body: schemas.SamplingFields,
    headers: Mapping[str, str],
    model: Model,
    params: SamplingParams,
    prompts: list[tuple[int, ...]],
    max_field: str,
    prompt_field: str,
    renames: Renames,
    explicit: bool | None = None,
) -> Prepared:
    """One GenerateRequest per (prompt, sample): the SLO and ids resolved once, max_tokens
    capped per prompt, seeds `seed + i`."""
    arrival = time.monotonic()
    fields = tandem_fields.resolve(body, headers)
    renames |= dict(fields.sources)
    num_choices = len(prompts) * body.n
    check_request(
        num_choices <= MAX_CHOICES,
        "n",
        f"{num_choices} choices (n x prompts); at most {MAX_CHOICES}",
    )
    rid = fields.request_id or uuid.uuid4().hex
    check_request_id(rid)
    ids = [rid] if num_choices == 1 else [f"{rid}-{k}" for k in range(num_choices)]
    for child in ids:
        check_request_id(child)
    check_priority(fields.priority)
    slo_class = fields.slo_class or DEFAULT_CLASS
    slo = resolve_slo(
        model.config.slo_classes,
        slo_class=slo_class,
        ttft_ms=fields.ttft_ms,
        tpot_ms=fields.tpot_ms,
        priority=fields.priority,
        best_effort=fields.best_effort,
    )
    params.check_vocab(model.limits.vocab_size)
    explicit = params.max_tokens is not None if explicit is None else explicit
    choices, prompt_of = [], []
    for p, prompt in enumerate(prompts):
        capped = cap_max_tokens(
            params, explicit, len(prompt), model.limits, max_field, prompt_field
        )
        for i in range(body.n):
            k = p * body.n + i
            seeded = capped if params.seed is None else replace(capped, seed=params.seed + i)
            choices.append(
                GenerateRequest(ids[k], prompt, seeded, slo, slo_class, arrival, fields.deadline)
            )
            prompt_of.append(p)
    return Prepared(
        request_id=rid,
        created=int(time.time()),
        choices=tuple(choices),
        prompt_of=tuple(prompt_of),
        prompts=tuple(prompts),
        deadline_mono=fields.deadline_mono,
        renames=renames,
    )


def echo_texts(body: schemas.CompletionRequest, prepared: Prepared, model: Model) -> list[str]:
    """Each prompt's text for `echo`: the body's text, or the decoded token ids."""
    return [
        p if isinstance(p, str) else model.tokenizer.decode(ids)
        for p, ids in zip(_prompt_list(body.prompt), prepared.prompts)
    ]
