"""What the engine returns per step and what `LLM.generate` returns per request."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.scheduler.output import TokenLogprobs


@dataclass
class RequestOutput:
    """A request's state after a step: cumulative tokens and text, plus this step's delta.

    `error` is set on the final output of a request the engine failed (finish_reason
    "abort"), e.g. its structured-output grammar did not compile."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    num_cached_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
