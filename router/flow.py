"""One request's path through the cluster, independent of gRPC plumbing.

Stages of `Orchestrator.run`:
  1. router queue: wait for a dispatch slot (EDF by priority, TTFT deadline);
  2. place: pick decode + prefill workers (or one colocated worker), or reject
     (RESOURCE_EXHAUSTED) before any worker is called;
  3. prefill: the first token is sent to the client at once; the slot is released. While the
     prefill runs, the prefill worker may hand out the KV handle (`kv_handle`: its KV streams
     layer by layer as the last step computes): the decode worker is then started at once,
     without the first token, and receives meanwhile (`RouterConfig.stream_kv`);
  4. decode: `start` on the decode worker (with the first token), then its StepOutputs (routed
     by the worker's StepDemux) are streamed, several per message when they queue up;
  5. the last message carries finish reason, token counts and stage timings, which add up to
     the end-to-end latency (`router.stage_clock` attributes the router's own hops).

Any exit other than a normal finish (client cancel, deadline, Abort RPC, worker failure)
aborts the request on both of its workers (fire-and-forget: the caller may already be
cancelled); `abort` is idempotent on the workers. A worker found broken answers UNAVAILABLE
at once: prefill waits and decode streams also watch the worker's `down` future, which the
registry resolves when heartbeats fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from engine.kv.block_hash import hash_blocks
from router import convert
from router.config import RouterConfig
from router.demux import StepDemux, StreamItem
from router.dispatch_gate import DispatchGate, RouterQueueFullError
from router.policy import Demand, Placement, Rejection, place, place_colocated
from router.registry import Pool, WorkerEntry, WorkerRegistry
from router.stage_clock import StageMarks, stage_timings
from router.validation import ValidatedRequest
from router.worker_api import (
    DecodeRequest,
    PrefillRequest,
    PrefillResult,
    StageTimes,
    StepOutput,
    WorkerRejectedError,
    WorkerUnavailableError,
)
from tandem.api import generation_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
Send = Callable[[pb.GenerateResponse], Awaitable[None]]
_WORKER_DEATH_ERRORS = {"RayActorError", "ActorDiedError", "ActorUnavailableError"}


class RouterError(Exception):
    """A request failed with a gRPC status code the server returns as is."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None = None) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason  # set when the request was refused before serving (router.metrics)


class _Aborted(Exception):
    """The Abort RPC named this request: it ends with finish_reason ABORT."""


_ABORT = _Aborted()


@dataclass(eq=False)
class _Active:
    request_id: str
    queue: asyncio.Queue[StreamItem | _Aborted]
    stop: asyncio.Future[None]
    workers: list[WorkerEntry] = field(default_factory=list)
    num_tokens: int = 0  # streamed so far
    num_cached_tokens: int = 0
    first_token_at: float | None = None
    dispatched_at: float | None = None  # the first worker call (router.stage_clock's marks)
    decode_started_at: float | None = None
    colocated: bool = False


class Orchestrator:
    def __init__(self, registry: WorkerRegistry, config: RouterConfig) -> None:
        self._registry = registry
        self._config = config
        self._gate = DispatchGate(config.max_inflight_prefills, config.max_queue, config.starvation_s)
        self._demux: dict[str, StepDemux] = {}
        self._active: dict[str, _Active] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        registry.on_worker_down(self._on_worker_down)

    # -- workers ------------------------------------------------------------------------------
    async def add_worker(self, worker_id: str, pool: Pool, handle: Any, metrics_target: str | None = None) -> None:
        """Register a worker; decode and colocated workers get a StepDemux."""
        await self._registry.add(worker_id, pool, handle, metrics_target)
        if Pool(pool) is not Pool.PREFILL:
            demux = StepDemux(worker_id, handle, self._registry, self._config.poll_wait_s, self._config.poll_grace_s)
            self._demux[worker_id] = demux
            demux.start()

    def _on_worker_down(self, worker_id: str) -> None:
        demux = self._demux.get(worker_id)
        if demux is not None:
            demux.fail_all("the worker stopped answering heartbeats")

    async def close(self) -> None:
        for demux in self._demux.values():
            await demux.stop()
        if self._bg:
            await asyncio.wait(self._bg, timeout=2.0)

    # -- requests -----------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        active = self._active.get(request_id)
        if active is None:
            return False
        if not active.stop.done():
            active.stop.set_result(None)
        active.queue.put_nowait(_ABORT)
        return True

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def num_queued(self) -> int:
        """Requests waiting in the router queue for a dispatch slot."""
        return self._gate.num_waiting

    @property
    def num_inflight_prefills(self) -> int:
        return self._gate.num_in_use

    async def run(self, req: ValidatedRequest, deadline: float | None, send: Send) -> None:
        """Serve one request, sending its responses through `send`. Raises RouterError."""
        rid = req.request_id or uuid.uuid4().hex
        if rid in self._active:
            raise RouterError(grpc.StatusCode.ALREADY_EXISTS, f"request_id: {rid!r} is already running",
                              "duplicate_request_id")
        loop = asyncio.get_running_loop()
        active = _Active(rid, asyncio.Queue(), loop.create_future())
        self._active[rid] = active
        finished = False
        try:
            await self._serve(req, active, deadline, send)
            finished = True
        finally:
            del self._active[rid]
            for entry in active.workers:
                if entry.worker_id in self._demux:
                    self._demux[entry.worker_id].close(rid)
            if not finished:
                self._abort_on_workers(active)

    def _abort_on_workers(self, active: _Active, workers: list[WorkerEntry] | None = None) -> None:
        """Aborts the request on its workers (or on `workers`), in the background."""
        for entry in active.workers if workers is None else workers:
            task = asyncio.ensure_future(self._abort_one(entry, active.request_id))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _abort_one(self, entry: WorkerEntry, request_id: str) -> None:
        try:
            await asyncio.wait_for(entry.handle.abort(request_id), self._config.heartbeat_timeout_s * 2)
        except Exception as exc:  # the worker may be dead; its heartbeat will tell
            log.info("abort of %s on %s failed: %r", request_id, entry.worker_id, exc)

    async def _serve(self, req: ValidatedRequest, active: _Active, deadline: float | None, send: Send) -> None:
        ttft_deadline = None if req.slo.ttft_s is None else req.arrival + req.slo.ttft_s
        try:
            await self._gate.acquire(req.slo.priority, ttft_deadline)
        except RouterQueueFullError as exc:
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), "queue_full") from None
        slot = _Slot(self._gate)
        prefill_times: StageTimes | None = None
        try:
            plan = self._place(req)
            path = self._colocated if plan.decode is None else self._disaggregated
            last, prefill_times = await path(req, active, plan, deadline, send, slot)
        except _Aborted:
            last = [StepOutput(active.request_id, (), finished=True, finish_reason="abort")]
            self._abort_on_workers(active)
        finally:
            slot.release()
        await send(self._final_message(req, active, last, prefill_times))

    # -- placement ----------------------------------------------------------------------------
    def _place(self, req: ValidatedRequest) -> Placement:
        prefill = self._registry.healthy(Pool.PREFILL)
        decode = self._registry.healthy(Pool.DECODE)
        colocated = not (prefill and decode)
        candidates = self._registry.healthy(Pool.COLOCATED) if colocated else prefill
        if not candidates:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, "no healthy workers can serve the request", "no_workers")
        demand = Demand(len(req.prompt_token_ids), req.max_new_tokens, req.slo)
        hashes = self._block_hashes(req, candidates[0].load.block_size)
        cached = {e.worker_id: e.prefix.num_hit_blocks(hashes) * e.load.block_size for e in candidates}
        views = [e.view() for e in candidates]
        if colocated:
            plan = place_colocated(views, demand, cached)
        else:
            plan = place(views, [e.view() for e in decode], demand, cached)
        if isinstance(plan, Rejection):
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"slo: {plan.reason}", "slo_infeasible")
        if hashes:
            self._registry.get(plan.prefill.worker_id).prefix.record(hashes)
        return plan

    def _block_hashes(self, req: ValidatedRequest, block_size: int) -> list[bytes]:
        if len(req.prompt_token_ids) < block_size:
            return []
        return hash_blocks(req.prompt_token_ids, block_size, self._config.kv_salt)

    # -- the two paths ------------------------------------------------------------------------
    async def _disaggregated(
        self, req: ValidatedRequest, active: _Active, plan: Placement, deadline: float | None,
        send: Send, slot: _Slot,
    ) -> tuple[list[StepOutput], StageTimes | None]:  # fmt: skip
        assert plan.decode is not None
        p = self._registry.get(plan.prefill.worker_id)
        d = self._registry.get(plan.decode.worker_id)
        active.workers += [p, d]
        uncached = len(req.prompt_token_ids) - plan.prefill.num_cached_tokens
        p.pending_prefill_tokens += uncached
        d.started_since_snapshot += 1
        d.reserved_blocks += plan.decode.num_blocks
        ttft_deadline = None if req.slo.ttft_s is None else time.time() + req.slo.ttft_s
        preq = PrefillRequest(active.request_id, req.prompt_token_ids, req.sampling_params,
                              ttft_deadline, req.slo.priority, d.worker_id)  # fmt: skip
        active.dispatched_at = time.monotonic()
        prefill = asyncio.ensure_future(self._watch(p, active, p.handle.prefill(preq)))
        try:
            receiving = await self._start_streamed(req, active, p, d, deadline, prefill)
            result: PrefillResult = await prefill
        finally:
            if not prefill.done():
                prefill.cancel()
            p.pending_prefill_tokens -= uncached
            slot.release()
        first = await self._send_first(active, result, send)
        if first is not None:
            if receiving:  # its KV went to the decode worker for nothing
                self._abort_on_workers(active, [d])
            return [first], result.timings
        if not receiving:
            self._demux[d.worker_id].open(active.request_id, active.queue)
        dreq = DecodeRequest(active.request_id, req.prompt_token_ids, result.first_token_id, result.kv_handle,
                             req.sampling_params, deadline, req.slo.priority, p.worker_id, result.text_delta)  # fmt: skip
        active.decode_started_at = time.monotonic()
        await self._watch(d, active, d.handle.start(dreq))
        return await self._stream(active, send), result.timings

    async def _start_streamed(
        self, req: ValidatedRequest, active: _Active, p: WorkerEntry, d: WorkerEntry, deadline: float | None,
        prefill: asyncio.Future[PrefillResult],
    ) -> bool:  # fmt: skip
        """Starts the decode worker on the prompt's KV while the prefill computes, once the
        prefill worker hands out the handle. False when it did not (it does not stream, or the
        prefill ended first): the decode worker then starts with the first token."""
        if not self._config.stream_kv or req.sampling_params.max_tokens == 1:  # 1: no decode follows
            return False
        early = asyncio.ensure_future(self._watch(p, active, p.handle.kv_handle(active.request_id)))
        try:
            await asyncio.wait((early, prefill), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not early.done():
                early.cancel()
        if prefill.done() or early.cancelled() or early.exception() is not None or not early.result():
            return False
        self._demux[d.worker_id].open(active.request_id, active.queue)
        dreq = DecodeRequest(active.request_id, req.prompt_token_ids, None, early.result(), req.sampling_params,
                             deadline, req.slo.priority, p.worker_id)  # fmt: skip
        await self._watch(d, active, d.handle.start(dreq))
        return True

    async def _colocated(
        self, req: ValidatedRequest, active: _Active, plan: Placement, deadline: float | None,
        send: Send, slot: _Slot,
    ) -> tuple[list[StepOutput], StageTimes | None]:  # fmt: skip
        w = self._registry.get(plan.prefill.worker_id)
        active.workers.append(w)
        active.colocated = True
        num_prompt = len(req.prompt_token_ids)
        w.pending_prefill_tokens += num_prompt
        w.started_since_snapshot += 1

        def on_first_token() -> None:
            w.pending_prefill_tokens -= num_prompt
            slot.release()

        self._demux[w.worker_id].open(active.request_id, active.queue)
        preq = PrefillRequest(active.request_id, req.prompt_token_ids, req.sampling_params,
                              deadline, req.slo.priority, None)  # fmt: skip
        active.dispatched_at = time.monotonic()
        try:
            await self._watch(w, active, w.handle.submit(preq))
            return await self._stream(active, send, on_first_token), None
        finally:
            if active.first_token_at is None:
                w.pending_prefill_tokens -= num_prompt

    # -- streaming ----------------------------------------------------------------------------
    async def _send_first(self, active: _Active, result: PrefillResult, send: Send) -> StepOutput | None:
        """Stream the first token now; when the request ends there, return it as the final output."""
        active.first_token_at = time.monotonic()
        active.num_cached_tokens = result.num_cached_tokens
        lps = () if result.logprobs is None else (result.logprobs,)
        first = StepOutput(active.request_id, (result.first_token_id,), result.text_delta,
                           result.finished, result.finish_reason, lps)  # fmt: skip
        if result.finished:
            return first
        active.num_tokens += 1
        await send(_message(active.request_id, [first]))
        return None

    async def _stream(
        self, active: _Active, send: Send, on_first_token: Callable[[], None] | None = None
    ) -> list[StepOutput]:
        """Forward StepOutputs, several per message when they queue up; return the last batch."""
        while True:
            batch = [await active.queue.get()]
            while not active.queue.empty():
                batch.append(active.queue.get_nowait())
            outputs = _check_batch(batch)
            if active.first_token_at is None and any(o.new_token_ids for o in outputs):
                active.first_token_at = time.monotonic()
                if on_first_token is not None:
                    on_first_token()
            final = next((i for i, o in enumerate(outputs) if o.finished), None)
            if final is not None:
                return outputs[: final + 1]
            active.num_tokens += sum(len(o.new_token_ids) for o in outputs)
            await send(_message(active.request_id, outputs))

    def _final_message(
        self, req: ValidatedRequest, active: _Active, last: list[StepOutput], prefill_times: StageTimes | None
    ) -> pb.GenerateResponse:
        now = time.monotonic()
        msg = _message(active.request_id, last)
        end = last[-1]
        msg.finish_reason = convert.finish_reason(end.finish_reason)
        msg.prompt_tokens = len(req.prompt_token_ids)
        msg.completion_tokens = active.num_tokens + len(msg.token_ids)
        msg.cached_prompt_tokens = active.num_cached_tokens
        marks = StageMarks(req.arrival, active.dispatched_at, active.first_token_at, active.decode_started_at,
                           active.colocated)  # fmt: skip
        msg.timings.CopyFrom(stage_timings(marks, prefill_times, end.timings, now))
        return msg

    # -- failure handling ---------------------------------------------------------------------
    async def _watch(self, entry: WorkerEntry, active: _Active, call: Coroutine[Any, Any, T]) -> T:
        """Await a worker call, but give up at once if the worker goes down or the request is aborted."""
        down = entry.down
        if down is None or down.done():
            call.close()
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"worker {entry.worker_id} is unavailable")
        task = asyncio.ensure_future(call)
        try:
            await asyncio.wait((task, down, active.stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return self._result(entry, task)
        if active.stop.done():
            raise _Aborted()
        raise RouterError(grpc.StatusCode.UNAVAILABLE, f"worker {entry.worker_id} became unavailable")

    def _result(self, entry: WorkerEntry, task: asyncio.Future[T]) -> T:
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, WorkerRejectedError):
            raise RouterError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"worker {entry.worker_id}: {exc.reason}",
                              "worker_rejected")
        if isinstance(exc, WorkerUnavailableError) or type(exc).__name__ in _WORKER_DEATH_ERRORS:
            self._registry.mark_unhealthy(entry.worker_id, repr(exc))
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"worker {entry.worker_id}: {exc}")
        log.error("worker %s failed a request", entry.worker_id, exc_info=exc)
        raise RouterError(grpc.StatusCode.INTERNAL, f"worker {entry.worker_id} failed: {exc!r}")


class _Slot:
    """A dispatch slot released exactly once."""

    def __init__(self, gate: DispatchGate) -> None:
        self._gate = gate
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.release()


def _message(request_id: str, outputs: list[StepOutput]) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id)
    for out in outputs:
        msg.token_ids.extend(out.new_token_ids)
        if out.text_delta:
            msg.text_delta += out.text_delta
        if out.logprobs:
            msg.logprobs.extend(convert.logprobs(out.logprobs))
    return msg


def _check_batch(batch: list[StreamItem | _Aborted]) -> list[StepOutput]:
    """Raise on an abort sentinel, a worker failure or a failed request; else the outputs."""
    outputs: list[StepOutput] = []
    for item in batch:
        if isinstance(item, _Aborted):
            raise _Aborted()
        if isinstance(item, BaseException):
            raise RouterError(grpc.StatusCode.UNAVAILABLE, str(item))
        if item.error is not None:
            raise RouterError(grpc.StatusCode.UNAVAILABLE, f"request failed on the worker: {item.error}")
        outputs.append(item)
    return outputs
