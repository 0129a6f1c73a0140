"""A request's outputs as the caller sees them: worker outputs in, `OutputBatch`es out.

`first_output` makes the prefill's first token an output; `stream` drains the request's queue
(its workers' StepOutputs, routed by their StepDemux), several outputs per batch when they
queue up, and raises `RequestError` (UNAVAILABLE) on a worker failure or a failed request, or
`Aborted` on the Abort call's sentinel; `final_batch` is the last batch, carrying the
`RequestSummary` (finish reason, token counts, stage timings: `router.stage_clock`). All of
them keep the request's marks in its `ActiveRequest`. No transport is known here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace

from router.attempt import Aborted, ActiveRequest
from router.demux import StreamItem
from router.errors import ErrorKind, RequestError
from router.request import FinishReason, GenerateRequest, OutputBatch, RequestSummary, Stage
from router.stage_clock import StageMarks, stage_timings
from tandem.contract.worker_api import PrefillResult, StepOutput

Batches = AsyncGenerator[OutputBatch, None]


def first_output(active: ActiveRequest, result: PrefillResult) -> StepOutput:
    """The prefill's first token as an output (final when the request ends there)."""
    active.first_token_at = time.monotonic()
    active.progress.stage = Stage.DECODE
    active.num_cached_tokens = result.num_cached_tokens
    lps = () if result.logprobs is None else (result.logprobs,)
    return StepOutput(
        active.request_id,
        (result.first_token_id,),
        result.text_delta,
        result.finished,
        result.finish_reason,
        lps,
    )


async def stream(
    active: ActiveRequest, on_first_token: Callable[[], None] | None = None
) -> Batches:
    """Yield StepOutputs, several per batch when they queue up; keep the last in `active`."""
    while True:
        items = [await active.queue.get()]
        while not active.queue.empty():
            items.append(active.queue.get_nowait())
        outputs = _check_batch(items)
        if active.first_token_at is None and any(o.new_token_ids for o in outputs):
            active.first_token_at = time.monotonic()
            active.progress.stage = Stage.DECODE
            if on_first_token is not None:
                on_first_token()
        final = next((i for i, o in enumerate(outputs) if o.finished), None)
        if final is not None:
            active.last = outputs[: final + 1]
            return
        active.num_tokens += sum(len(o.new_token_ids) for o in outputs)
        yield batch_of(active.request_id, outputs)


def final_batch(req: GenerateRequest, active: ActiveRequest) -> OutputBatch:
    """The last batch: the final outputs and the request's summary."""
    now = time.monotonic()
    assert active.last, "every way to the end records the final outputs"
    batch = batch_of(active.request_id, active.last)
    end = active.last[-1]
    marks = StageMarks(
        req.arrival,
        active.dispatched_at,
        active.first_token_at,
        active.decode_started_at,
        active.colocated,
    )
    summary = RequestSummary(
        finish_reason=FinishReason.parse(end.finish_reason),
        num_prompt_tokens=len(req.prompt_token_ids),
        num_completion_tokens=active.num_tokens + len(batch.token_ids),
        num_cached_prompt_tokens=active.num_cached_tokens,
        timings=stage_timings(marks, active.prefill_times, end.timings, now),
    )
    return replace(batch, summary=summary)


def batch_of(request_id: str, outputs: list[StepOutput]) -> OutputBatch:
    """The outputs' tokens, text and logprobs as one batch."""
    return OutputBatch(
        request_id,
        tuple(t for out in outputs for t in out.new_token_ids),
        "".join(out.text_delta for out in outputs),
        tuple(lp for out in outputs for lp in out.logprobs),
    )


def _check_batch(items: list[StreamItem | Aborted]) -> list[StepOutput]:
    """Raise on an abort sentinel, a worker failure or a failed request; else the outputs."""
    outputs: list[StepOutput] = []
    for item in items:
        if isinstance(item, Aborted):
            raise Aborted()
        if isinstance(item, BaseException):
            raise RequestError(ErrorKind.UNAVAILABLE, str(item))
        if item.error is not None:
            raise RequestError(ErrorKind.UNAVAILABLE, f"request failed on the worker: {item.error}")
        outputs.append(item)
    return outputs
