"""The colocated worker: one engine prefills (chunked) and decodes; the baseline for every
disaggregation result, and the mode for small deployments. Same output stream as decode."""

from __future__ import annotations

import time
from typing import Any

from decode_worker.outbox import Outbox
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from prefill_worker.common import PoolWorker, WorkerCore
from router.worker_api import (
    PrefillRequest,
    StageTimes,
    StepOutput,
    WorkerRejectedError,
    deadline_to_monotonic,
)


class ColocatedWorker(PoolWorker):
    def __init__(self, worker_id: str, engine_kwargs: dict[str, Any], calibrate: bool = True,
                 metrics_host: str = "127.0.0.1", metrics_port: int | None = 0) -> None:
        self.outbox = Outbox()
        self._requests: dict[str, tuple[Request, float]] = {}
        self._first_token: dict[str, float] = {}
        self.core = WorkerCore(worker_id, engine_kwargs, self._on_output, transport="fake", calibrate=calibrate,
                               pool="colocated", metrics_host=metrics_host, metrics_port=metrics_port)
        self.core.start()

    async def submit(self, req: PrefillRequest) -> None:
        self.outbox.bind()

        def add(engine: LLMEngine) -> None:
            request = engine.add_request(req.request_id, list(req.prompt_token_ids), req.sampling_params,
                                         priority=req.priority, deadline=deadline_to_monotonic(req.deadline))
            self._requests[req.request_id] = (request, time.monotonic())

        try:
            await self.core.aengine.run(add)
        except ValueError as exc:
            raise WorkerRejectedError(str(exc)) from exc

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        return await self.outbox.next_outputs(max_wait_s)

    async def abort(self, request_id: str) -> None:
        def abort(engine: LLMEngine) -> None:
            engine.abort([request_id])
            self._requests.pop(request_id, None)
            self._first_token.pop(request_id, None)

        await self.core.aengine.run(abort)


    def shutdown(self) -> None:
        self.core.shutdown()

    def _on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        self._first_token.setdefault(out.request_id, now)
        timings = None
        if out.finished:
            request, submitted = self._requests.pop(out.request_id, (None, now))
            first = self._first_token.pop(out.request_id)
            scheduled = (request.first_scheduled_time if request else None) or submitted
            timings = StageTimes(prefill_queue=scheduled - submitted, prefill=first - scheduled,
                                 decode_queue=0.0, decode=now - first)
        self.outbox.put([StepOutput(
            request_id=out.request_id, new_token_ids=tuple(out.new_token_ids), text_delta=out.text_delta,
            finished=out.finished, finish_reason=out.finish_reason,
            logprobs=tuple(out.logprobs[-1:]) if out.logprobs else (), timings=timings,
        )])
