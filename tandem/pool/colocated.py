"""The colocated worker: one engine prefills (chunked) and decodes; the baseline for every
disaggregation result, and the mode for small deployments. Same output stream as decode.

A request's state is a `ColocatedStatus` in one table: PREFILLING from `submit` until its first
token is out, then DECODING. The engine's scheduler owns its blocks in both, so its exits free
through the engine: a finish (the engine freed them) or an abort (`engine.abort`).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from engine.engine import LLMEngine
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.request import Request
from tandem.contract.worker_api import (
    PrefillRequest,
    StageTimes,
    StepOutput,
    WorkerRejectedError,
    deadline_to_monotonic,
)
from tandem.pool.core import PoolWorker, WorkerCore
from tandem.pool.outbox import Outbox, step_output
from tandem.pool.router_watch import DEFAULT_ROUTER_TIMEOUT_S


class ColocatedStatus(enum.Enum):
    PREFILLING = "prefilling"  # queued or prefilling: no token out yet
    DECODING = "decoding"  # its first token is out


@dataclass(eq=False)
class _Submitted:
    """A request accepted here. Times are `time.monotonic()` of this process."""

    request: Request
    submitted: float
    status: ColocatedStatus = ColocatedStatus.PREFILLING
    first_token_at: float | None = None


class ColocatedWorker(PoolWorker):
    def __init__(
        self,
        worker_id: str,
        engine_kwargs: dict[str, Any],
        calibrate: bool = True,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        router_timeout_s: float = DEFAULT_ROUTER_TIMEOUT_S,
    ) -> None:
        """`router_timeout_s`: with no router call for this long, every request here is aborted."""
        self.outbox = Outbox()
        self._requests: dict[str, _Submitted] = {}  # engine thread only
        self.core = WorkerCore(
            worker_id,
            engine_kwargs,
            self._on_output,
            transport="fake",
            calibrate=calibrate,
            pool="colocated",
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            on_router_lost=self._abort_all,
            router_timeout_s=router_timeout_s,
        )
        self.core.start()

    async def submit(self, req: PrefillRequest) -> None:
        self.outbox.bind()

        def add(engine: LLMEngine) -> None:
            request = engine.add_request(
                req.request_id,
                list(req.prompt_token_ids),
                req.sampling_params,
                priority=req.priority,
                deadline=deadline_to_monotonic(req.deadline),
            )
            self._requests[req.request_id] = _Submitted(request, time.monotonic())

        try:
            await self.core.aengine.run(add)
        except InvalidRequestError as exc:
            raise WorkerRejectedError(exc.message, field=exc.field) from exc
        except ValueError as exc:
            raise WorkerRejectedError(str(exc)) from exc

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        self.core.heard_router()
        try:
            return await self.outbox.next_outputs(max_wait_s)
        finally:
            self.core.heard_router()

    async def abort(self, request_id: str) -> None:
        def abort(engine: LLMEngine) -> None:
            engine.abort([request_id])  # frees its blocks, whatever its status
            self._requests.pop(request_id, None)

        await self.core.aengine.run(abort)

    def shutdown(self) -> None:
        self.core.shutdown()

    def _abort_all(self) -> int:
        """Engine thread; the router is lost (tandem.pool.router_watch): abort every request."""
        request_ids = list(self._requests)
        self.core.engine.abort(request_ids)  # frees their blocks, whatever their status
        self._requests.clear()
        return len(request_ids)

    def _on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        entry = self._requests.get(out.request_id)
        if entry is not None and entry.status is ColocatedStatus.PREFILLING:
            entry.status, entry.first_token_at = ColocatedStatus.DECODING, now
        timings = None
        if out.finished:  # the engine freed its blocks
            self._requests.pop(out.request_id, None)
            timings = None if entry is None else _timings(entry, now)
        self.outbox.put([step_output(out, timings)])


def _timings(entry: _Submitted, now: float) -> StageTimes:
    assert entry.first_token_at is not None
    scheduled = entry.request.first_scheduled_time or entry.submitted
    return StageTimes(
        prefill_queue=scheduled - entry.submitted,
        prefill=entry.first_token_at - scheduled,
        decode_queue=0.0,
        decode=now - entry.first_token_at,
    )
