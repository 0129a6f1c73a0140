"""One running request in the router, and what it holds until it ends. Plain types only.

`ActiveRequest` is the orchestrator's record of a request from registration until it ends: its
output queue (fed by the workers' StepDemux, or the Abort call's `ABORT` sentinel), its `stop`
future (resolved by the Abort call, so that worker calls give up at once), the workers it was
placed on (aborted there on any exit but a normal finish) and the marks its summary is made
of. `PrefillHold` is what it holds until its prefill ends: the dispatch slot and the prompt's
booking, each given back exactly once.

The workers know a request by its attempt id (`attempt_id`), never by the caller's id alone;
`decode_request` is what the decode worker is asked for an attempt.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from router.demux import StreamItem
from router.dispatch_gate import DispatchGate
from router.registry import Reservation, WorkerEntry
from router.request import GenerateRequest, RequestTrace
from tandem.contract.worker_api import DecodeRequest, PrefillResult, StageTimes, StepOutput


class Aborted(Exception):
    """The Abort call named this request: it ends with finish_reason ABORT."""


ABORT = Aborted()


@dataclass(eq=False)
class ActiveRequest:
    request_id: str  # the caller's: unique among running requests only
    attempt_id: str  # what the workers know this request by (`attempt_id`)
    queue: asyncio.Queue[StreamItem | Aborted]
    stop: asyncio.Future[None]
    progress: RequestTrace  # the caller's view of its ids and stage
    workers: list[WorkerEntry] = field(default_factory=list)
    num_tokens: int = 0  # yielded so far
    num_cached_tokens: int = 0
    first_token_at: float | None = None
    dispatched_at: float | None = None  # the first worker call (router.stage_clock's marks)
    decode_started_at: float | None = None
    colocated: bool = False
    prefill_times: StageTimes | None = None  # the prefill worker's, once its result came
    last: list[StepOutput] = field(default_factory=list)  # the final outputs, once it ended


class Slot:
    """A dispatch slot released exactly once."""

    def __init__(self, gate: DispatchGate) -> None:
        self._gate = gate
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.release()


@dataclass(frozen=True)
class PrefillHold:
    """What a request holds until its prefill ends: the dispatch slot and its prompt's
    booking. `end()` gives both back; it is idempotent."""

    slot: Slot
    reservation: Reservation

    def end(self) -> None:
        self.slot.release()
        self.reservation.end_prefill()


def attempt_id(request_id: str) -> str:
    """The id the workers know one attempt at `request_id` by: the id and a random suffix.

    The caller's id is unique among running requests only, and may come again once its request
    ended. The workers key what they keep past a request's end by this id: the KV lease and its
    transfer (until ack, failure or expiry; the receiver remembers finished transfers), the
    prefill's early KV handle, and an abort sent in the background, which may land after a new
    request with the same id began. Per attempt, none of those can meet a later request."""
    return f"{request_id}#{uuid.uuid4().hex[:12]}"


def decode_request(
    req: GenerateRequest,
    active: ActiveRequest,
    prefill_worker_id: str,
    handle: bytes,
    first: PrefillResult | None,
) -> DecodeRequest:
    """What the decode worker is asked: decode from the prefill's KV `handle`; `first` None: before its first token exists."""
    return DecodeRequest(
        active.attempt_id,
        req.prompt_token_ids,
        None if first is None else first.first_token_id,
        handle,
        req.sampling_params,
        req.deadline,
        req.slo.priority,
        prefill_worker_id,
        "" if first is None else first.text_delta,
    )
