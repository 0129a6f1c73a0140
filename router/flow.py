"""One request's path through the cluster, in plain types: no transport is known here.

`Orchestrator.generate(request)` takes a `router.request.GenerateRequest` and yields
`OutputBatch`es, the last carrying the `RequestSummary`; a failure raises
`router.errors.RequestError` (a kind, never a transport's status). Its stages:
  1. router queue: wait for a dispatch slot (EDF by priority, TTFT deadline);
  2. place: pick decode + prefill workers (or one colocated worker), or reject
     (RESOURCE_EXHAUSTED) before any worker is called; the placement's load is booked in the
     registry in one call (`WorkerRegistry.reserve`) and given back by its Reservation;
  3. prefill: the first token is yielded at once; the slot and the prompt's booking are given
     back. While the prefill runs, the prefill worker may hand out the KV handle (`kv_handle`:
     its KV streams layer by layer as the last step computes): the decode worker is then
     started at once, without the first token, and receives meanwhile
     (`RouterConfig.stream_kv`);
  4. decode: `start` on the decode worker (with the first token), then its StepOutputs (routed
     by the worker's StepDemux) are yielded, several per batch when they queue up
     (`router.decode_stream`);
  5. the last batch carries finish reason, token counts and stage timings, which add up to
     the end-to-end latency (`router.stage_clock` attributes the router's own hops).
Each running request is an `ActiveRequest` (`router.attempt`: its queue, its stop future, its
workers and marks, and the `PrefillHold` given back when its prefill ends).

Any exit other than a normal finish (the caller stops iterating or is cancelled: a client
cancel or a deadline at the front door; the Abort call; a worker failure) aborts the request
on both of its workers (fire-and-forget: the caller may already be cancelled); `abort` is
idempotent on the workers. Iterate inside `contextlib.aclosing` so that an early exit runs
at once, not when the generator is collected. A worker found broken answers UNAVAILABLE at
once: prefill waits and decode streams also watch the worker's `down` future, which the
registry resolves when heartbeats fail.

The workers know a request by its attempt id (`router.attempt.attempt_id`: the caller's id and a random
suffix), never by the caller's id alone: that is unique among running requests only, and what
a worker keeps of an ended request (its KV transfer, a late abort) must not meet a new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine
from contextlib import aclosing
from typing import Any, TypeVar

from engine.errors import InvalidRequestError
from engine.kv.block_hash import hash_blocks
from router.attempt import (
    ABORT,
    Aborted,
    ActiveRequest,
    PrefillHold,
    Slot,
    attempt_id,
    decode_request,
)
from router.config import RouterConfig
from router.decode_stream import Batches, batch_of, final_batch, first_output, stream
from router.demux import StepDemux
from router.dispatch_gate import DispatchGate, RouterQueueFullError
from router.errors import ErrorKind, RequestError
from router.policy import Demand, Placement, Rejection, place, place_colocated
from router.registry import Pool, WorkerEntry, WorkerRegistry
from router.request import GenerateRequest, RequestTrace, Stage
from router.tasks import first_done
from router.validation import wire_field
from tandem.contract.worker_api import (
    PrefillRequest,
    PrefillResult,
    StepOutput,
    WorkerRejectedError,
    WorkerUnavailableError,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_WORKER_DEATH_ERRORS = {"RayActorError", "ActorDiedError", "ActorUnavailableError"}


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a side task's failure as seen: the path that reads it may have moved on (asyncio
    otherwise logs "Task exception was never retrieved")."""
    if not future.cancelled():
        future.exception()


class Orchestrator:
    def __init__(self, registry: WorkerRegistry, config: RouterConfig) -> None:
        self._registry = registry
        self._config = config
        self._gate = DispatchGate(
            config.max_inflight_prefills, config.max_queue, config.starvation_s
        )
        self._demux: dict[str, StepDemux] = {}
        self._active: dict[str, ActiveRequest] = {}
        self._bg: set[asyncio.Task[Any]] = set()
        self._draining = False
        registry.on_worker_down(self._on_worker_down)
        registry.on_room_freed(self._gate.room_freed)

    # -- workers ------------------------------------------------------------------------------
    async def add_worker(
        self, worker_id: str, pool: Pool, handle: Any, metrics_target: str | None = None
    ) -> None:
        """Register a worker; decode and colocated workers get a StepDemux."""
        await self._registry.add(worker_id, pool, handle, metrics_target)
        if Pool(pool) is not Pool.PREFILL:
            c = self._config
            demux = StepDemux(worker_id, handle, self._registry, c.poll_wait_s, c.poll_grace_s)
            self._demux[worker_id] = demux
            demux.start()

    def _on_worker_down(self, worker_id: str) -> None:
        self._gate.room_freed()  # parked requests place again: they may be refused now
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
        """End a running request with finish reason ABORT. False when no such request runs."""
        active = self._active.get(request_id)
        if active is None:
            return False
        if not active.stop.done():
            active.stop.set_result(None)
        active.queue.put_nowait(ABORT)
        return True

    def drain(self) -> None:
        """Refuse every new request from now on (UNAVAILABLE "draining"); running ones go on.
        One way: a draining router is on its way to stopping."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_active(self) -> int:
        """Requests registered and not yet ended: queued, prefilling, transferring or decoding."""
        return len(self._active)

    @property
    def num_queued(self) -> int:
        """Requests waiting in the router queue for a dispatch slot."""
        return self._gate.num_waiting

    @property
    def num_inflight_prefills(self) -> int:
        return self._gate.num_in_use

    async def generate(self, req: GenerateRequest, progress: RequestTrace | None = None) -> Batches:
        """Serve one request: its output batches, the last with the summary (module docstring).

        Raises RequestError; an early exit aborts the request on its workers. `progress`, when
        given, follows the request's ids and stage.
        """
        active = self._register(req, RequestTrace() if progress is None else progress)
        finished = False
        try:
            async with aclosing(self._serve(req, active)) as batches:
                async for batch in batches:
                    finished = batch.is_final  # the workers are done with it
                    yield batch
        finally:
            self._unregister(active, finished)

    def _register(self, req: GenerateRequest, progress: RequestTrace) -> ActiveRequest:
        if self._draining:
            raise RequestError(
                ErrorKind.UNAVAILABLE,
                "draining: the router is shutting down and takes no new requests",
            )
        rid = req.request_id or uuid.uuid4().hex
        if rid in self._active:
            raise RequestError(
                ErrorKind.ALREADY_EXISTS,
                f"request_id: {rid!r} is already running",
                reason="duplicate_request_id",
            )
        loop = asyncio.get_running_loop()
        active = ActiveRequest(
            rid, attempt_id(rid), asyncio.Queue(), loop.create_future(), progress
        )
        progress.request_id, progress.attempt_id = rid, active.attempt_id
        self._active[rid] = active
        return active

    def _unregister(self, active: ActiveRequest, finished: bool) -> None:
        del self._active[active.request_id]
        for entry in active.workers:
            if entry.worker_id in self._demux:
                self._demux[entry.worker_id].close(active.attempt_id)
        if not finished:
            self._abort_on_workers(active)

    def _abort_on_workers(
        self, active: ActiveRequest, workers: list[WorkerEntry] | None = None
    ) -> None:
        """Aborts the request on its workers (or on `workers`), in the background."""
        for entry in active.workers if workers is None else workers:
            task = asyncio.ensure_future(self._abort_one(entry, active.attempt_id))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _abort_one(self, entry: WorkerEntry, attempt_id: str) -> None:
        timeout_s = self._config.heartbeat_timeout_s * 2
        try:
            await asyncio.wait_for(entry.handle.abort(attempt_id), timeout_s)
        except Exception as exc:  # the worker may be dead; its heartbeat will tell
            log.info("abort of %s on %s failed: %r", attempt_id, entry.worker_id, exc)

    async def _serve(self, req: GenerateRequest, active: ActiveRequest) -> Batches:
        slot: Slot | None = None
        try:
            slot, plan = await self._admit(req, active)
            with self._registry.reserve(plan, len(req.prompt_token_ids)) as reservation:
                hold = PrefillHold(slot, reservation)
                path = self._colocated if plan.decode is None else self._disaggregated
                async with aclosing(path(req, active, plan, hold)) as batches:
                    async for batch in batches:
                        yield batch
        except Aborted:
            active.last = [StepOutput(active.request_id, (), finished=True, finish_reason="abort")]
            self._abort_on_workers(active)
        finally:
            if slot is not None:
                slot.release()
        yield final_batch(req, active)

    async def _admit(self, req: GenerateRequest, active: ActiveRequest) -> tuple[Slot, Placement]:
        """A dispatch slot and a placement. A best-effort request that no worker has KV room
        for now gives its slot back and parks (counted in the router queue, bounded by
        `max_queue`) until room may have freed, then queues for a slot again, rather than be
        sent to a worker that would refuse it. Raises Aborted when aborted while parked."""
        while True:
            slot = await self._acquire_slot(req)
            try:
                plan = self._place(req)
            except BaseException:
                slot.release()
                raise
            if plan is not None:
                return slot, plan
            slot.release()
            await self._wait_for_room(active)

    async def _wait_for_room(self, active: ActiveRequest) -> None:
        room = asyncio.ensure_future(self._gate.wait_for_room())
        room.add_done_callback(_retrieve)
        try:
            await first_done(room, active.stop)
        finally:
            if not room.done():
                room.cancel()
        if active.stop.done():
            raise Aborted()
        try:
            room.result()
        except RouterQueueFullError as exc:
            raise self._refusal(str(exc), "queue_full") from None

    async def _acquire_slot(self, req: GenerateRequest) -> Slot:
        ttft_deadline = None if req.slo.ttft_s is None else req.arrival + req.slo.ttft_s
        try:
            await self._gate.acquire(req.slo.priority, ttft_deadline)
        except RouterQueueFullError as exc:
            raise self._refusal(str(exc), "queue_full") from None
        return Slot(self._gate)

    def _refusal(self, message: str, reason: str) -> RequestError:
        """RESOURCE_EXHAUSTED; retrying helps once the router's load picture can change."""
        return RequestError(
            ErrorKind.RESOURCE_EXHAUSTED,
            message,
            reason=reason,
            retry_after_s=self._config.heartbeat_interval_s,
        )

    # -- placement ----------------------------------------------------------------------------
    def _place(self, req: GenerateRequest) -> Placement | None:
        """The placement, or None for a best-effort request no worker has KV room for now."""
        prefill = self._registry.healthy(Pool.PREFILL)
        decode = self._registry.healthy(Pool.DECODE)
        colocated = not (prefill and decode)
        candidates = self._registry.healthy(Pool.COLOCATED) if colocated else prefill
        if not candidates:
            raise RequestError(
                ErrorKind.UNAVAILABLE,
                "no healthy workers can serve the request",
                reason="no_workers",
            )
        demand = Demand(len(req.prompt_token_ids), req.max_new_tokens, req.slo)
        hashes = self._block_hashes(req, candidates[0].load.block_size)
        cached = {
            e.worker_id: e.prefix.num_hit_blocks(hashes) * e.load.block_size for e in candidates
        }
        views = [e.view() for e in candidates]
        if colocated:
            plan = place_colocated(views, demand, cached)
        else:
            plan = place(views, [e.view() for e in decode], demand, cached)
        if isinstance(plan, Rejection):
            if plan.no_room and req.slo.best_effort:
                return None
            raise self._refusal(f"slo: {plan.reason}", "slo_infeasible")
        if hashes:
            self._registry.get(plan.prefill.worker_id).prefix.record(hashes)
        return plan

    def _block_hashes(self, req: GenerateRequest, block_size: int) -> list[bytes]:
        if len(req.prompt_token_ids) < block_size:
            return []
        return hash_blocks(req.prompt_token_ids, block_size, self._config.kv_salt)

    # -- the two paths ------------------------------------------------------------------------
    async def _disaggregated(
        self, req: GenerateRequest, active: ActiveRequest, plan: Placement, hold: PrefillHold
    ) -> Batches:
        assert plan.decode is not None
        p = self._registry.get(plan.prefill.worker_id)
        d = self._registry.get(plan.decode.worker_id)
        active.workers += [p, d]
        try:
            result, receiving = await self._prefill(req, active, p, d)
        finally:
            hold.end()
        if receiving:  # the decode worker has it: its next snapshot shows it
            hold.reservation.mark_started()
        active.prefill_times = result.timings
        first = first_output(active, result)
        if result.finished:
            active.last = [first]
            if receiving:  # its KV went to the decode worker for nothing
                self._abort_on_workers(active, [d])
            return
        active.num_tokens += 1
        yield batch_of(active.request_id, [first])
        if not receiving:
            self._demux[d.worker_id].open(active.attempt_id, active.queue)
        dreq = decode_request(req, active, p.worker_id, result.kv_handle, result)
        active.decode_started_at = time.monotonic()
        await self._watch(d, active, d.handle.start(dreq))
        hold.reservation.mark_started()
        async with aclosing(stream(active)) as batches:
            async for batch in batches:
                yield batch

    async def _prefill(
        self, req: GenerateRequest, active: ActiveRequest, p: WorkerEntry, d: WorkerEntry
    ) -> tuple[PrefillResult, bool]:
        """The prefill's result, and whether the decode worker already receives its KV."""
        ttft_deadline = None if req.slo.ttft_s is None else time.time() + req.slo.ttft_s
        preq = PrefillRequest(
            active.attempt_id,
            req.prompt_token_ids,
            req.sampling_params,
            ttft_deadline,
            req.slo.priority,
            d.worker_id,
        )
        active.dispatched_at = time.monotonic()
        active.progress.stage = Stage.PREFILL
        prefill = asyncio.ensure_future(self._watch(p, active, p.handle.prefill(preq)))
        prefill.add_done_callback(_retrieve)
        try:
            receiving = await self._start_streamed(req, active, p, d, prefill)
            return await prefill, receiving
        finally:
            if not prefill.done():
                prefill.cancel()

    async def _start_streamed(
        self,
        req: GenerateRequest,
        active: ActiveRequest,
        p: WorkerEntry,
        d: WorkerEntry,
        prefill: asyncio.Future[PrefillResult],
    ) -> bool:
        """Starts the decode worker on the prompt's KV while the prefill computes, once the
        prefill worker hands out the handle. False when it did not (it does not stream, or the
        prefill ended first): the decode worker then starts with the first token."""
        if not self._config.stream_kv or req.sampling_params.max_tokens == 1:  # 1: no decode
            return False
        early = asyncio.ensure_future(self._watch(p, active, p.handle.kv_handle(active.attempt_id)))
        early.add_done_callback(_retrieve)  # when the prefill ends first, nobody reads it
        try:
            await first_done(early, prefill)
        finally:
            if not early.done():
                early.cancel()
        if prefill.done() or early.cancelled() or early.exception() is not None:
            return False
        handle = early.result()
        if not handle:
            return False
        self._demux[d.worker_id].open(active.attempt_id, active.queue)
        dreq = decode_request(req, active, p.worker_id, handle, None)
        await self._watch(d, active, d.handle.start(dreq))
        return True

    async def _colocated(
        self, req: GenerateRequest, active: ActiveRequest, plan: Placement, hold: PrefillHold
    ) -> Batches:
        w = self._registry.get(plan.prefill.worker_id)
        active.workers.append(w)
        active.colocated = True
        self._demux[w.worker_id].open(active.attempt_id, active.queue)
        preq = PrefillRequest(
            active.attempt_id,
            req.prompt_token_ids,
            req.sampling_params,
            req.deadline,
            req.slo.priority,
            None,
        )
        active.dispatched_at = time.monotonic()
        active.progress.stage = Stage.PREFILL
        await self._watch(w, active, w.handle.submit(preq))
        hold.reservation.mark_started()
        async with aclosing(stream(active, hold.end)) as batches:
            async for batch in batches:
                yield batch

    # -- failure handling ---------------------------------------------------------------------
    async def _watch(
        self, entry: WorkerEntry, active: ActiveRequest, call: Coroutine[Any, Any, T]
    ) -> T:
        """Await a worker call, but give up at once if the worker goes down or the request is
        aborted."""
        down = entry.down
        if down is None or down.done():
            call.close()
            raise RequestError(ErrorKind.UNAVAILABLE, f"worker {entry.worker_id} is unavailable")
        task = asyncio.ensure_future(call)
        try:
            await first_done(task, down, active.stop)
        finally:
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled():
            return self._result(entry, task)
        if active.stop.done():
            raise Aborted()
        raise RequestError(ErrorKind.UNAVAILABLE, f"worker {entry.worker_id} became unavailable")

    def _result(self, entry: WorkerEntry, task: asyncio.Future[T]) -> T:
        exc = task.exception()
        if exc is None:
            return task.result()
        wid = entry.worker_id
        field = getattr(exc, "field", None)  # the worker found the request invalid
        if isinstance(exc, WorkerRejectedError) and field is not None:
            raise RequestError.invalid(InvalidRequestError(wire_field(field), exc.reason))
        if isinstance(exc, WorkerRejectedError):
            raise self._refusal(f"worker {wid}: {exc.reason}", "worker_rejected")
        if isinstance(exc, WorkerUnavailableError) or type(exc).__name__ in _WORKER_DEATH_ERRORS:
            self._registry.mark_unhealthy(wid, repr(exc))
            raise RequestError(ErrorKind.UNAVAILABLE, f"worker {wid}: {exc}")
        log.error("worker %s failed a request", wid, exc_info=exc)
        raise RequestError(ErrorKind.INTERNAL, f"worker {wid} failed: {exc!r}")
