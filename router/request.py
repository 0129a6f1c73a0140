"""What a front door hands the router's request flow, and what the flow hands back. Pure.

A front door (router/server.py for gRPC; an HTTP gateway would be a sibling) validates its
wire message into a `GenerateRequest`, iterates `Orchestrator.generate(request)` and writes
each `OutputBatch` out in its own format. The last batch carries the `RequestSummary`.
Failures are `router.errors.RequestError`s. No type here knows a transport.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.sampling_params import SamplingParams
from engine.scheduler.output import TokenLogprobs
from router.slo import Slo
from router.stage_clock import StageTimings


@dataclass(frozen=True)
class GenerateRequest:
    """A request that passed every check, prompt tokenized.

    `sampling_params.max_tokens` is set, capped by the context. `slo` holds the resolved targets,
    priority and best-effort flag of `slo_class`. `arrival` is `time.monotonic()` when the
    front door received it; `deadline` (UNIX seconds, None: none) is the end-to-end deadline the
    workers are told. The front door enforces it: it stops iterating the flow (gRPC cancels the
    handler at its deadline), which aborts the request on its workers.
    """

    request_id: str | None
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    slo: Slo
    slo_class: str
    arrival: float
    deadline: float | None = None

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "validation refuses empty prompts"
        assert self.sampling_params.max_tokens is not None, "validation caps max_tokens"

    @property
    def max_new_tokens(self) -> int:
        assert self.sampling_params.max_tokens is not None
        return self.sampling_params.max_tokens


class Stage(enum.Enum):
    """How far the flow got with a request."""

    ROUTER_QUEUE = "router_queue"  # waiting for a dispatch slot, or being placed
    PREFILL = "prefill"  # sent to its workers; its first token is not out (KV transfer included)
    DECODE = "decode"  # its first token is out


@dataclass
class RequestTrace:
    """Where a request is, for the front door that serves it: the flow fills it in (the ids
    once it registered the request, then each stage it enters), so a failure can say where it
    happened. `request_id` is the caller's (or the one made up for it), `attempt_id` the id its
    workers know it by."""

    request_id: str | None = None
    attempt_id: str | None = None
    stage: Stage = Stage.ROUTER_QUEUE


class FinishReason(enum.Enum):
    STOP = "stop"  # a stop token or string
    LENGTH = "length"  # max_tokens or the context
    ABORT = "abort"  # aborted on request (the Abort RPC)

    @classmethod
    def parse(cls, reason: str | None) -> FinishReason | None:
        """A worker's finish reason ("stop", "length", "abort"); None for anything else."""
        try:
            return cls(reason)
        except ValueError:
            return None


@dataclass(frozen=True)
class RequestSummary:
    """How a request ended: counts and stage timings that add up to its end-to-end latency.

    `finish_reason` None: the worker named none the router knows.
    """

    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_prompt_tokens: int
    timings: StageTimings


@dataclass(frozen=True)
class OutputBatch:
    """New tokens of one request since the previous batch (several engine steps when they
    queued up) with their logprobs when asked for. `summary` is set on the last batch only."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text_delta: str = ""
    logprobs: tuple[TokenLogprobs, ...] = ()
    summary: RequestSummary | None = None

    @property
    def is_final(self) -> bool:
        return self.summary is not None
