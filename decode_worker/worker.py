"""The decode worker (a Ray actor): prefilled requests in, one output batch per step out.

Stages of one request:
  1. `start(req)`: on the engine thread, allocate blocks for the prompt's KV (or refuse with
     WorkerRejectedError, holding nothing) and start pulling it through the KV receiver. A
     streamed prefill's request comes before its first token (`first_token_id` None): a second
     `start` brings the token. If its transfer failed before that token came, the request has
     left already with its error output, and the second `start` does nothing (`_failed_early`);
  2. before every engine step, poll each incoming transfer without blocking: DONE -> the
     request joins the running batch once its first token is known (a landed request waits
     at most `transfer_timeout_s` for it); FAILED -> a final error output;
  3. the engine decodes every running request each step; all their new tokens leave as one
     batch through `next_outputs()` (the router's long poll).
Each request's state is an `ArrivalStatus` in one table (decode_worker/arrivals.py, which
says what each status holds). Every way out leaves through the table's `remove` and frees what
the status held: a finish (the engine freed the blocks), an abort or a first-token timeout
(`_leave`, by status), a failed transfer (the receiver returns the blocks). Block ownership:
on DONE the destination blocks are the request's; after FAILED or a cancel, the transport may
still be writing, so they are freed only in the receiver's `on_release`, which may come on a
later poll: such a transfer is owed (`_owed`) and polled until then, whatever else runs.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from decode_worker.arrivals import Arrival, Arrivals, ArrivalStatus
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll
from kvtransfer.pool_link import KVGroupSpec, make_receiver
from tandem.contract.worker_api import (
    DecodeRequest,
    StageTimes,
    StepOutput,
    WorkerRejectedError,
    deadline_to_monotonic,
)
from tandem.pool.core import PoolWorker, WorkerCore
from tandem.pool.outbox import Outbox, step_output
from tandem.pool.router_watch import DEFAULT_ROUTER_TIMEOUT_S

AWAITING_KV = ArrivalStatus.AWAITING_KV
KV_LANDED = ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN
RUNNING = ArrivalStatus.RUNNING
_MAX_FAILED_EARLY = 1024  # remembered streamed failures; the router's second start comes soon


class DecodeWorker(PoolWorker):
    def __init__(
        self,
        worker_id: str,
        engine_kwargs: dict[str, Any],
        transfer_timeout_s: float = 30.0,
        calibrate: bool = True,
        kv_group: KVGroupSpec | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        swap_cpu_bytes: int = 256 << 20,
        router_timeout_s: float = DEFAULT_ROUTER_TIMEOUT_S,
    ) -> None:
        """`swap_cpu_bytes`: the CPU tier that preempted requests swap into (0: recompute).
        `router_timeout_s`: with no router call for this long, every request here is aborted."""
        self.outbox = Outbox()
        self._arrivals = Arrivals()  # engine thread only
        self._owed: set[str] = set()  # cancelled transfers whose blocks the receiver still owes
        # streamed requests whose transfer failed before their first token came (oldest first)
        self._failed_early: OrderedDict[str, None] = OrderedDict()
        self.transfer_timeout_s = transfer_timeout_s
        self.core = WorkerCore(
            worker_id,
            engine_kwargs,
            self._on_output,
            self._poll_transfers,
            has_work=lambda: self._arrivals.count(AWAITING_KV) > 0 or bool(self._owed),
            transport="nccl" if kv_group else "grpc",
            calibrate=calibrate,
            pool="decode",
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            on_router_lost=self._abort_all,
            router_timeout_s=router_timeout_s,
        )
        self.core.metrics.touch_transport(self.core.transport)
        self.receiver = make_receiver(
            self.core.view, kv_group, on_release=self._on_release, timeout_s=transfer_timeout_s
        )
        self.swap_store = self.core.attach_tiers(swap_cpu_bytes, swap=True)
        self.core.start()

    # ----------------------------------------------------------- actor API

    async def start(self, req: DecodeRequest) -> None:
        self.outbox.bind()
        await self.core.aengine.run(lambda engine: self._start(engine, req))

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        self.core.heard_router()
        try:
            return await self.outbox.next_outputs(max_wait_s)
        finally:
            self.core.heard_router()

    async def abort(self, request_id: str) -> None:
        await self.core.aengine.run(lambda engine: self._leave(engine, request_id))

    def shutdown(self) -> None:
        self.receiver.close()
        self.core.shutdown()

    # --------------------------------------------------- engine-thread side

    def _start(self, engine: LLMEngine, req: DecodeRequest) -> None:
        """A streamed request's second `start` brings its first token; any other accepts.

        A second `start` for a streamed request whose transfer failed before it came does
        nothing: the request's error output (the transfer's failure) went out already, and the
        router answers it. Accepting again would meet the receiver, which remembers the
        transfer id, and fail as an internal error."""
        if req.first_token_id is not None and req.request_id in self._failed_early:
            del self._failed_early[req.request_id]
            return
        arrival = self._arrivals.get(req.request_id)
        if arrival is not None and not arrival.has_first_token and req.first_token_id is not None:
            self._first_token(engine, req, arrival)
        else:
            self._accept(engine, req, KVHandle.from_bytes(req.kv_handle))

    def _first_token(self, engine: LLMEngine, req: DecodeRequest, arrival: Arrival) -> None:
        """The first token of a request whose KV was started early; it decodes once both are in."""
        assert req.first_token_id is not None
        engine.set_first_token(arrival.request, req.first_token_id, req.first_text)
        arrival.first_token_at = time.monotonic()
        if arrival.status is KV_LANDED:
            self._run(engine, req.request_id)

    def _accept(self, engine: LLMEngine, req: DecodeRequest, handle: KVHandle) -> None:
        rid = req.request_id
        if rid in self._arrivals or engine.scheduler.get_request(rid):
            raise WorkerRejectedError(f"request {rid!r} is already here")
        request = engine.add_prefilled(
            rid,
            list(req.prompt_token_ids),
            req.first_token_id,
            req.sampling_params,
            priority=req.priority,
            deadline=deadline_to_monotonic(req.deadline),
            first_text=req.first_text,
        )
        if request is None:
            raise WorkerRejectedError("no free KV blocks for the prompt")
        try:
            self.receiver.start(handle, request.block_ids[: handle.num_blocks])
        except Exception:  # it did not begin, so nothing writes the blocks: free them now
            engine.release_blocks(engine.drop_prefilled(request))
            raise
        self._arrivals.add(rid, Arrival(request, time.monotonic(), handle.num_blocks))

    def _run(self, engine: LLMEngine, request_id: str) -> None:
        """KV landed and first token known: the request joins the running batch."""
        arrival = self._arrivals.advance(request_id, RUNNING)
        engine.activate_prefilled(arrival.request)

    def _poll_transfers(self) -> None:
        engine = self.core.engine
        for transfer_id in list(self._owed):  # cancelled: their blocks come back on a poll
            self.receiver.poll(transfer_id)
        for request_id, arrival in self._arrivals.with_status(AWAITING_KV):
            state = self.receiver.poll(request_id)
            if state is KVPoll.DONE:
                self._kv_landed(engine, request_id, arrival)
            elif state is KVPoll.FAILED:
                self._kv_failed(engine, request_id)
        now = time.monotonic()
        for request_id, waiting in self._arrivals.with_status(KV_LANDED):
            assert waiting.kv_landed is not None
            if now - waiting.kv_landed > self.transfer_timeout_s:  # the router is gone
                self._leave(engine, request_id)
                timeout = f"{self.transfer_timeout_s:g}s"
                self._fail(request_id, f"no first token within {timeout} of the KV")

    def _kv_landed(self, engine: LLMEngine, request_id: str, arrival: Arrival) -> None:
        landed = arrival.kv_landed = time.monotonic()
        num_bytes = arrival.num_blocks * self.core.view.bytes_per_block()
        self.core.metrics.transfer_done(self.core.transport, num_bytes, landed - arrival.accepted)
        if arrival.has_first_token:
            self._run(engine, request_id)
        else:
            self._arrivals.advance(request_id, KV_LANDED)

    def _kv_failed(self, engine: LLMEngine, request_id: str) -> None:
        """The receiver gave up: writes have stopped and it returns the blocks through
        `on_release`, so the request is only forgotten here."""
        reason = self.receiver.failure_reason(request_id) or "KV transfer failed"
        self.core.metrics.transfer_failed(self.core.transport, reason)
        arrival = self._arrivals.remove(request_id)
        assert arrival is not None and arrival.status is AWAITING_KV
        engine.drop_prefilled(arrival.request)
        if not arrival.has_first_token:  # its second `start` is still to come
            self._failed_early[request_id] = None
            while len(self._failed_early) > _MAX_FAILED_EARLY:
                self._failed_early.popitem(last=False)
        self._fail(request_id, f"KV transfer failed: {reason}")

    def _leave(self, engine: LLMEngine, request_id: str) -> None:
        """Abort or timeout: forget the request and free what its status held. Idempotent."""
        self._failed_early.pop(request_id, None)
        arrival = self._arrivals.remove(request_id)
        if arrival is None:  # unknown, finished or gone already
            return
        if arrival.status is AWAITING_KV:
            self._cancel_transfer(request_id, engine.drop_prefilled(arrival.request))
        elif arrival.status is KV_LANDED:  # its KV is in its blocks, which nothing else owns
            engine.release_blocks(engine.drop_prefilled(arrival.request))
        else:  # RUNNING: the scheduler owns the request and its blocks
            engine.abort([request_id])

    def _abort_all(self) -> int:
        """The router is lost (tandem.pool.router_watch): every request leaves as by `abort`,
        whatever its status; returns how many."""
        self._failed_early.clear()
        request_ids = [
            rid for status in ArrivalStatus for rid, _ in self._arrivals.with_status(status)
        ]
        for request_id in request_ids:
            self._leave(self.core.engine, request_id)
        return len(request_ids)

    def _cancel_transfer(self, transfer_id: str, block_ids: list[int]) -> None:
        """Cancel a transfer whose DONE this worker has not seen, and settle who frees its
        blocks. Its writes may still be landing: the receiver then hands the blocks back through
        `on_release` on a later poll, which `_poll_transfers` keeps making while any is owed (no
        arrival need await KV any more). Or it finished just before the cancel (the receiver's
        thread got its last block and acked; `cancel` is then a no-op): the blocks hold its KV
        and are ours to free."""
        self.receiver.cancel(transfer_id)
        state = self.receiver.poll(transfer_id)
        if state is KVPoll.DONE:
            self.core.engine.release_blocks(block_ids)
        elif state is not KVPoll.FAILED:  # FAILED: released already, inside cancel or poll
            self._owed.add(transfer_id)

    def _fail(self, request_id: str, error: str) -> None:
        """A final error output for a request that never ran (it has left the table)."""
        final = StepOutput(request_id, (), finished=True, finish_reason="abort", error=error)
        self.outbox.put([final])

    def _on_release(self, transfer_id: str, block_ids: list[int]) -> None:
        self._owed.discard(transfer_id)
        self.core.engine.release_blocks(block_ids)

    def _on_output(self, out: RequestOutput) -> None:
        timings = None
        if out.finished:  # the engine freed its blocks
            timings = _timings(self._arrivals.remove(out.request_id))
        self.outbox.put([step_output(out, timings)])


def _timings(arrival: Arrival | None) -> StageTimes | None:
    """kv_transfer: from accepting the request (streamed: from its first token, the prefill
    having run meanwhile) until its KV landed (0 when it had landed before)."""
    if arrival is None or arrival.kv_landed is None:
        return None
    now = time.monotonic()
    since = arrival.first_token_at or arrival.accepted
    ready = max(arrival.kv_landed, since)
    scheduled = arrival.request.first_scheduled_time or ready
    return StageTimes(
        kv_transfer=max(0.0, arrival.kv_landed - since),
        decode_queue=max(0.0, scheduled - ready),
        decode=now - scheduled,
    )
