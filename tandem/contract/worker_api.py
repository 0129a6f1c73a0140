"""The router's only view of workers: async interfaces and the plain messages they exchange.

Real prefill / decode Ray actors implement these protocols (the router awaits actor method
calls through a thin adapter, or the actor handle itself when its methods match); the
in-process `tandem.testing.fake_worker` implements them for tests and benchmarks. Messages are frozen
dataclasses of plain values (no torch, no protobuf objects) so they cross Ray actor calls as is.

Time: `deadline` fields are absolute UNIX seconds (`time.time()`), because `time.monotonic()`
is not comparable across hosts; a worker converts with `deadline_to_monotonic()`. Durations are
seconds.

Contracts shared by every worker:
* `abort(request_id)` is idempotent and ignores unknown ids. It frees whatever the request
  holds on that worker (queued work, KV blocks, a KV lease held for a transfer). After an abort a
  decode worker emits at most one final `StepOutput` for the id (finish_reason "abort"); the
  router ignores outputs for ids it no longer tracks.
* `load()` answers quickly (it is the heartbeat); a worker that cannot serve reports
  `healthy=False` rather than raising.
* Failures of the worker as a whole raise (`WorkerUnavailableError` or the transport's error,
  e.g. Ray's ActorDiedError); failures of one request are reported in that request's result
  (`StepOutput.error`) or raised as `WorkerRejectedError` when the request was never accepted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from engine.sampling_params import SamplingParams
from engine.scheduler.output import TokenLogprobs

__all__ = [
    "ColocatedWorker",
    "CostModel",
    "DecodeRequest",
    "DecodeWorker",
    "LoadSnapshot",
    "PrefillRequest",
    "PrefillResult",
    "PrefillWorker",
    "SamplingParams",
    "StageTimes",
    "StepOutput",
    "TokenLogprobs",
    "WorkerRejectedError",
    "WorkerUnavailableError",
    "deadline_to_monotonic",
]


class WorkerUnavailableError(RuntimeError):
    """The worker as a whole cannot serve (dead, draining, hung). The router maps it to UNAVAILABLE."""


class WorkerRejectedError(RuntimeError):
    """The worker refused one request before accepting it (e.g. no KV room). `reason` says why.
    `field` is set when the request itself is invalid (the engine's InvalidRequestError field,
    e.g. "structured" for a grammar xgrammar refuses): the router answers INVALID_ARGUMENT."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def deadline_to_monotonic(deadline: float | None) -> float | None:
    """Convert an absolute UNIX-seconds deadline into this process's `time.monotonic()` clock."""
    if deadline is None:
        return None
    return time.monotonic() + (deadline - time.time())


@dataclass(frozen=True)
class StageTimes:
    """Seconds a worker spent on one request, per stage; None where the stage is not its own."""

    prefill_queue: float | None = None
    prefill: float | None = None
    kv_transfer: float | None = None
    decode_queue: float | None = None
    decode: float | None = None


@dataclass(frozen=True)
class CostModel:
    """A worker's calibrated costs, used by the router to predict TTFT and TPOT.

    prefill(n) = prefill_s_per_request + prefill_s_per_token * n
    decode_step(batch, ctx) = decode_step_s + decode_step_s_per_seq * batch
                              + decode_step_s_per_context_token * ctx
    transfer(n) = (transfer_s_per_token + kv_bytes_per_token * transfer_s_per_byte) * n
                  (KV of n tokens from this prefill worker: its KVCacheSpec's bytes per token,
                  every head, in its KV dtype, over its transport's seconds per byte)
    """

    prefill_s_per_token: float = 0.0
    prefill_s_per_request: float = 0.0
    decode_step_s: float = 0.0
    decode_step_s_per_seq: float = 0.0
    decode_step_s_per_context_token: float = 0.0
    transfer_s_per_token: float = 0.0
    kv_bytes_per_token: int = 0
    transfer_s_per_byte: float = 0.0

    def prefill_seconds(self, num_tokens: int) -> float:
        return self.prefill_s_per_request + self.prefill_s_per_token * num_tokens

    def decode_step_seconds(self, batch_size: int, total_context_tokens: int) -> float:
        return (
            self.decode_step_s
            + self.decode_step_s_per_seq * batch_size
            + self.decode_step_s_per_context_token * total_context_tokens
        )

    def transfer_seconds(self, num_tokens: int) -> float:
        per_token = self.transfer_s_per_token + self.kv_bytes_per_token * self.transfer_s_per_byte
        return per_token * num_tokens


@dataclass(frozen=True)
class LoadSnapshot:
    """A worker's load at one instant (the heartbeat payload).

    `num_queued_prefill_tokens`: prompt tokens accepted but not yet prefilled. `num_running` /
    `num_waiting`: requests in the running batch / waiting for admission. KV blocks are those of
    the HBM pool; `tier_blocks` maps a tier name ("hbm", "cpu", "nvme") to blocks held there.
    `incarnation`: a token the worker process draws once at start; a new one means the worker
    was restarted and holds none of what was placed on it before (None: not reported).
    """

    num_queued_prefill_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    block_size: int = 16
    healthy: bool = True
    tier_blocks: Mapping[str, int] = field(default_factory=dict)
    incarnation: str | None = None

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks


@dataclass(frozen=True)
class PrefillRequest:
    """Prefill one prompt and sample its first token.

    `deadline` (UNIX s) is when the first token is due (the TTFT target): the worker's EDF key.
    `decode_worker_id` is a hint naming the decode worker that will pull the KV (a prefill
    worker may start pushing early); None when colocated or unknown.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    deadline: float | None = None
    priority: int = 0
    decode_worker_id: str | None = None


@dataclass(frozen=True)
class PrefillResult:
    """The first token and a handle on the prompt's KV.

    `finished` is True when the request ends at its first token (max_tokens 1, a stop token or
    string): then no decode follows, and `kv_handle` may be empty (the worker has freed the KV).
    Otherwise `kv_handle` (a serialized KV handle; opaque to the router) is leased to the decode
    worker: the prefill worker frees the blocks on the decode side's ack, on `abort`, or when the
    lease expires.
    """

    request_id: str
    first_token_id: int
    text_delta: str
    finished: bool
    finish_reason: str | None
    kv_handle: bytes
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    logprobs: TokenLogprobs | None = None
    timings: StageTimes = StageTimes()


@dataclass(frozen=True)
class DecodeRequest:
    """Continue a prefilled request: pull its KV through `kv_handle`, then decode from `first_token_id`.

    `deadline` (UNIX s) is the end-to-end deadline (None: none). `num_output_tokens_so_far` is 1
    (the first token counts toward max_tokens and stop checks).

    `first_token_id` None: the prefill is still computing (the handle came from
    `PrefillWorker.kv_handle`): the worker starts receiving the KV now and decodes once a second
    `start` for the same id brings the first token (that call's `kv_handle` is ignored).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    first_token_id: int | None
    kv_handle: bytes
    sampling_params: SamplingParams
    deadline: float | None = None
    priority: int = 0
    prefill_worker_id: str | None = None
    first_text: str = ""


@dataclass(frozen=True)
class StepOutput:
    """One request's new tokens from one engine step.

    On the last output of a request `finished` is True and `finish_reason` is "stop", "length"
    or "abort"; `timings` is filled on that last output. `error` is set when the request failed
    on the worker (e.g. the KV transfer failed): the output is then final, and the router
    answers UNAVAILABLE.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str = ""
    finished: bool = False
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    timings: StageTimes | None = None
    error: str | None = None


@runtime_checkable
class PrefillWorker(Protocol):
    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """Queue (EDF), prefill and sample the first token. Raises WorkerRejectedError if refused."""
        ...

    async def kv_handle(self, request_id: str) -> bytes:
        """The KV handle of a request being prefilled, as soon as the step that completes its
        prompt is enqueued (its KV streams out layer by layer while that step computes), so
        the decode side can start receiving before the first token exists. b"" when this
        worker does not stream or the prefill ended without a handle; call it while `prefill`
        is in flight. The `PrefillResult` carries the same handle."""
        ...

    async def abort(self, request_id: str) -> None: ...

    async def load(self) -> LoadSnapshot: ...

    async def cost_model(self) -> CostModel: ...


class _StepStream(Protocol):
    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        """Long poll: every StepOutput produced since the previous call, in step order.

        Returns as soon as at least one output exists, or [] after `max_wait_s` (so the caller
        can tell an idle worker from a hung one). The worker produces one batch per engine step
        covering all its requests. Exactly one consumer (the router) calls it at a time.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    async def load(self) -> LoadSnapshot: ...

    async def cost_model(self) -> CostModel: ...


@runtime_checkable
class DecodeWorker(_StepStream, Protocol):
    async def start(self, req: DecodeRequest) -> None:
        """Accept a request (returns once queued, before its KV arrives).

        Raises WorkerRejectedError when it cannot take it (no KV room): nothing is then held.
        Its tokens after the first arrive through `next_outputs()`. With `first_token_id` None
        it only receives the KV; a second `start` with the first token lets it decode.
        """
        ...


@runtime_checkable
class ColocatedWorker(_StepStream, Protocol):
    async def submit(self, req: PrefillRequest) -> None:
        """Accept a request that this worker prefills and decodes (chunked prefill).

        Every token, the first included, arrives through `next_outputs()`; the last output's
        `timings` fill prefill_queue, prefill, decode_queue and decode (kv_transfer stays None).
        """
        ...
