"""Worker-API dataclasses -> wire messages (tandem.v1)."""

from __future__ import annotations

from collections.abc import Sequence

from engine.scheduler.output import TokenLogprobs
from router.registry import WorkerEntry
from router.worker_api import LoadSnapshot
from tandem.api import generation_pb2 as pb

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def finish_reason(reason: str | None) -> pb.FinishReason:
    return FINISH_REASONS.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def logprobs(items: Sequence[TokenLogprobs]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(logprob=lp.logprob, top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
        for lp in items
    ]



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
