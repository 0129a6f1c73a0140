"""Router dataclasses -> wire messages (tandem.v1): responses, status, load."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from engine.scheduler.output import TokenLogprobs
from router.registry import WorkerEntry
from router.request import FinishReason, OutputBatch, RequestSummary
from router.stage_clock import StageTimings
from tandem.api import generation_pb2 as pb
from tandem.contract.worker_api import LoadSnapshot

FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def finish_reason(reason: FinishReason | None) -> pb.FinishReason:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else FINISH_REASONS[reason]


def logprobs(items: Sequence[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]
        )
        for lp in items
    ]


def stage_timings(timings: StageTimings) -> pb.StageTimings:
    """Every stage the request reached is set; the others stay unset (HasField False)."""
    values = {f.name: getattr(timings, f.name) for f in fields(timings)}
    return pb.StageTimings(**{name: value for name, value in values.items() if value is not None})


def response(batch: OutputBatch) -> pb.GenerateResponse:
    """One streamed message; the last also carries finish reason, counts and timings."""
    msg = pb.GenerateResponse(
        request_id=batch.request_id, token_ids=batch.token_ids, text_delta=batch.text_delta
    )
    if batch.logprobs:
        msg.logprobs.extend(logprobs(batch.logprobs))
    if batch.summary is not None:
        _summarize(msg, batch.summary)
    return msg


def _summarize(msg: pb.GenerateResponse, summary: RequestSummary) -> None:
    msg.finish_reason = finish_reason(summary.finish_reason)
    msg.prompt_tokens = summary.num_prompt_tokens
    msg.completion_tokens = summary.num_completion_tokens
    msg.cached_prompt_tokens = summary.num_cached_prompt_tokens
    msg.timings.CopyFrom(stage_timings(summary.timings))


def load_snapshot(load: LoadSnapshot) -> pb.LoadSnapshot:
    return pb.LoadSnapshot(
        queued_prefill_tokens=load.num_queued_prefill_tokens,
        running=load.num_running,
        waiting=load.num_waiting,
        free_kv_blocks=load.num_free_blocks,
        total_kv_blocks=load.num_total_blocks,
        block_size=load.block_size,
        tier_blocks=dict(load.tier_blocks),
    )


def worker_status(entry: WorkerEntry, now: float) -> pb.WorkerStatus:
    age = now - entry.last_ok if entry.last_ok else -1.0
    return pb.WorkerStatus(
        worker_id=entry.worker_id,
        pool=entry.pool.value,
        healthy=entry.healthy,
        load=load_snapshot(entry.load),
        heartbeat_age=age,
    )
