"""The decode worker (a Ray actor): prefilled requests in, one output batch per step out.

Stages of one request:
  1. `start(req)`: on the engine thread, allocate blocks for the prompt's KV (or refuse with
     WorkerRejectedError, holding nothing) and start pulling it through the KV receiver. A
     streamed prefill's request comes before its first token (`first_token_id` None): a second
     `start` brings the token;
  2. before every engine step, poll each incoming transfer without blocking: DONE -> the
     request joins the running batch once its first token is known (a landed request waits
     at most `transfer_timeout_s` for it); FAILED -> a final error output;
  3. the engine decodes every running request each step; all their new tokens leave as one
     batch through `next_outputs()` (the router's long poll).
Block ownership: on DONE the destination blocks are the request's; after FAILED or a cancel,
the transport may still be writing, so they are freed only in the receiver's `on_release`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from decode_worker.outbox import Outbox
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll
from kvtransfer.pool_link import KVGroupSpec, make_receiver
from prefill_worker.common import PoolWorker, WorkerCore
from router.worker_api import (
    DecodeRequest,
    StageTimes,
    StepOutput,
    WorkerRejectedError,
    deadline_to_monotonic,
)


@dataclass
class _Arrival:
    """A request accepted here: its KV is incoming until `kv_landed` is set."""

    request: Request
    accepted: float
    num_blocks: int  # blocks the transfer writes (for the bytes-received metric)
    kv_landed: float | None = None
    first_token_at: float | None = None  # when a streamed request's first token came

    @property
    def has_first_token(self) -> bool:
        return bool(self.request.output_token_ids)


class DecodeWorker(PoolWorker):
    def __init__(self, worker_id: str, engine_kwargs: dict[str, Any], transfer_timeout_s: float = 30.0,
                 calibrate: bool = True, kv_group: KVGroupSpec | None = None, metrics_host: str = "127.0.0.1",
                 metrics_port: int | None = 0, swap_cpu_bytes: int = 256 << 20) -> None:
        """`swap_cpu_bytes`: the CPU tier that preempted requests swap into (0: recompute)."""
        self.outbox = Outbox()
        self._arrivals: dict[str, _Arrival] = {}  # until the request finishes
        self._incoming: dict[str, _Arrival] = {}  # the subset whose KV has not landed
        self._landed: dict[str, _Arrival] = {}  # KV landed, first token not yet here (streamed)
        self.transfer_timeout_s = transfer_timeout_s
        self.core = WorkerCore(worker_id, engine_kwargs, self._on_output, self._poll_transfers,
                               has_work=lambda: bool(self._incoming), transport="nccl" if kv_group else "grpc",
                               calibrate=calibrate, pool="decode", metrics_host=metrics_host, metrics_port=metrics_port)
        self.core.metrics.touch_transport(self.core.transport)
        self.receiver = make_receiver(self.core.view, kv_group, on_release=self._on_release, timeout_s=transfer_timeout_s)
        self.swap_store = self.core.attach_tiers(swap_cpu_bytes, swap=True)
        self.core.start()

    # ----------------------------------------------------------- actor API

    async def start(self, req: DecodeRequest) -> None:
        self.outbox.bind()
        arrival = self._arrivals.get(req.request_id)
        if arrival is not None and not arrival.has_first_token and req.first_token_id is not None:
            await self.core.aengine.run(lambda engine: self._first_token(engine, req))
            return
        handle = KVHandle.from_bytes(req.kv_handle)
        await self.core.aengine.run(lambda engine: self._accept(engine, req, handle))

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        return await self.outbox.next_outputs(max_wait_s)

    async def abort(self, request_id: str) -> None:
        await self.core.aengine.run(lambda engine: self._abort(engine, request_id))


    def shutdown(self) -> None:
        self.receiver.close()
        self.core.shutdown()

    # --------------------------------------------------- engine-thread side

    def _first_token(self, engine: LLMEngine, req: DecodeRequest) -> None:
        """The first token of a request whose KV was started early; it decodes once both are in."""
        arrival = self._arrivals.get(req.request_id)
        if arrival is None or arrival.has_first_token:
            raise WorkerRejectedError(f"request {req.request_id!r} is not waiting for its first token")
        assert req.first_token_id is not None
        engine.set_first_token(arrival.request, req.first_token_id, req.first_text)
        arrival.first_token_at = time.monotonic()
        if self._landed.pop(req.request_id, None) is not None:
            engine.activate_prefilled(arrival.request)

    def _accept(self, engine: LLMEngine, req: DecodeRequest, handle: KVHandle) -> None:
        if req.request_id in self._arrivals or engine.scheduler.get_request(req.request_id):
            raise WorkerRejectedError(f"request {req.request_id!r} is already here")
        request = engine.add_prefilled(
            req.request_id, list(req.prompt_token_ids), req.first_token_id, req.sampling_params,
            priority=req.priority, deadline=deadline_to_monotonic(req.deadline), first_text=req.first_text,
        )
        if request is None:
            raise WorkerRejectedError("no free KV blocks for the prompt")
        self.receiver.start(handle, request.block_ids[: handle.num_blocks])
        arrival = _Arrival(request, time.monotonic(), handle.num_blocks)
        self._arrivals[req.request_id] = self._incoming[req.request_id] = arrival

    def _poll_transfers(self) -> None:
        for request_id, incoming in list(self._incoming.items()):
            state = self.receiver.poll(request_id)
            if state is KVPoll.DONE:
                del self._incoming[request_id]
                landed = incoming.kv_landed = time.monotonic()
                num_bytes = incoming.num_blocks * self.core.view.bytes_per_block()
                self.core.metrics.transfer_done(self.core.transport, num_bytes, landed - incoming.accepted)
                if incoming.has_first_token:
                    self.core.engine.activate_prefilled(incoming.request)
                else:
                    self._landed[request_id] = incoming
            elif state is KVPoll.FAILED:
                del self._incoming[request_id]
                reason = self.receiver.failure_reason(request_id) or "KV transfer failed"
                self.core.metrics.transfer_failed(self.core.transport, reason)
                self._drop(incoming.request)
                self._fail(request_id, f"KV transfer failed: {reason}")
        now = time.monotonic()
        for request_id, waiting in list(self._landed.items()):
            assert waiting.kv_landed is not None
            if now - waiting.kv_landed > self.transfer_timeout_s:  # the router is gone: free the KV
                del self._landed[request_id]
                self.core.engine.release_blocks(self.core.engine.drop_prefilled(waiting.request))
                self._fail(request_id, f"no first token within {self.transfer_timeout_s:g}s of the KV")

    def _fail(self, request_id: str, error: str) -> None:
        """A final error output for a request that never ran (the caller saw to its blocks)."""
        self._arrivals.pop(request_id, None)
        self.outbox.put([StepOutput(request_id, (), finished=True, finish_reason="abort", error=error)])

    def _drop(self, request: Request) -> None:
        """Forget a request whose KV never landed. Its blocks are exactly the transfer's
        destination blocks, so they come back through `on_release` once writes stopped."""
        self.core.engine.drop_prefilled(request)

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        incoming = self._incoming.pop(request_id, None)
        landed = self._landed.pop(request_id, None)
        self._arrivals.pop(request_id, None)
        if landed is not None:  # its KV is in its blocks, which nothing else owns
            engine.release_blocks(engine.drop_prefilled(landed.request))
            return
        if incoming is None:
            engine.abort([request_id])
            return
        self.receiver.cancel(request_id)
        self._drop(incoming.request)

    def _on_release(self, transfer_id: str, block_ids: list[int]) -> None:
        self.core.engine.release_blocks(block_ids)

    def _on_output(self, out: RequestOutput) -> None:
        timings = None
        if out.finished:
            timings = _timings(self._arrivals.pop(out.request_id, None))
        self.outbox.put([StepOutput(
            request_id=out.request_id,
            new_token_ids=tuple(out.new_token_ids),
            text_delta=out.text_delta,
            finished=out.finished,
            finish_reason=out.finish_reason,
            logprobs=tuple(out.logprobs[-1:]) if out.logprobs else (),
            timings=timings,
        )])


def _timings(arrival: _Arrival | None) -> StageTimes | None:
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
