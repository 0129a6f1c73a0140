"""The prefill worker (a Ray actor): prompts in, first tokens and leased KV handles out.

Stages of one request:
  1. `prefill(req)` queues it in the engine (its scheduler orders by priority, deadline and age,
     with a starvation guard) as a prefill-only request: max_tokens 1, KV held at the end;
  2. the engine loop prefills it (chunked with the other prompts) and samples the first token;
  3. streamed (the default where the KV view copies locally: TP = 1): as soon as the step that
     completes the prompt is enqueued, its blocks are leased through the KV sender
     (`transfer_id` = request id) with one CUDA event per layer, and `kv_handle(request_id)`
     answers with the handle: the decode side receives while the prefill computes, each
     layer's KV leaving once written. Not streamed (TP > 1): the blocks are leased when the
     first token is out;
  4. the first token returns with the handle; a request that ends at its first token frees
     its blocks (streamed: by failing its lease, so a transfer under way drains first);
  5. the lease ends on the decode side's ack, on `abort`, or at expiry; `on_release` frees the
     blocks on the engine thread.
Every sender callback and every block operation runs on the engine thread.

A request waiting for its first token is in `_pending` with a `PrefillStatus`: PREFILLING (the
engine holds its blocks) until a streamed lease makes it KV_STREAMING (the sender holds them
too, until the decode side's ack, a failure or expiry). Its first token takes it out; what it
held then goes to the decode side (a lease) or is freed (the request ends there).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from engine.engine import HeldKVEnqueued, LLMEngine
from engine.errors import InvalidRequestError
from engine.outputs import RequestOutput
from engine.request import Request
from kvtransfer.pool_link import KVGroupSpec, make_sender
from tandem.contract.worker_api import (
    PrefillRequest,
    PrefillResult,
    StageTimes,
    WorkerRejectedError,
    deadline_to_monotonic,
)
from tandem.pool.core import PoolWorker, WorkerCore
from tandem.pool.router_watch import DEFAULT_ROUTER_TIMEOUT_S

log = logging.getLogger(__name__)
_ENDED_REMEMBERED = 1024  # prefills whose early handle nobody awaited yet: kv_handle answers b""


class PrefillStatus(enum.Enum):
    PREFILLING = "prefilling"  # queued or computing; the engine holds its blocks
    KV_STREAMING = "kv_streaming"  # its last step is enqueued, its blocks leased (handle out)


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted: float
    real_max_tokens: int | None
    status: PrefillStatus = PrefillStatus.PREFILLING
    handle: bytes = b""  # KV_STREAMING: the lease's handle


class PrefillWorker(PoolWorker):
    def __init__(
        self,
        worker_id: str,
        engine_kwargs: dict[str, Any],
        host: str = "127.0.0.1",
        lease_s: float = 30.0,
        calibrate: bool = True,
        kv_group: KVGroupSpec | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        prefix_cpu_bytes: int = 0,
        router_timeout_s: float = DEFAULT_ROUTER_TIMEOUT_S,
    ) -> None:
        """`prefix_cpu_bytes`: a CPU tier that evicted prefix blocks spill into and hits load from.
        `router_timeout_s`: with no router call for this long, every request and lease here is
        aborted (tandem.pool.router_watch)."""
        self._pending: dict[str, _Pending] = {}
        self._leased: set[str] = set()  # transfer ids registered and not yet released
        self._early: dict[str, asyncio.Future] = {}  # kv_handle() calls waiting, by request id
        self._ended: OrderedDict[str, bytes] = OrderedDict()  # handles (or b"") nobody awaited yet
        self.kv_group = kv_group
        self.core = WorkerCore(
            worker_id,
            engine_kwargs,
            self._on_output,
            self._poll_sender,
            transport="nccl" if kv_group else "grpc",
            calibrate=calibrate,
            pool="prefill",
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            on_router_lost=self._abort_all,
            router_timeout_s=router_timeout_s,
        )
        self.sender = make_sender(
            self.core.view,
            kv_group,
            worker_id=worker_id,
            model_salt=self.core.salt,
            on_release=self._on_release,
            lease_s=lease_s,
            host=host,
        )
        self.prefix_store = self.core.attach_tiers(prefix_cpu_bytes, swap=False)
        self.streams_kv = self.core.view.local_copies  # a TP group's view reads through collectives
        if self.streams_kv:
            self.core.engine.stream_held_kv(self._on_kv_enqueued)
        self.core.start()

    # ----------------------------------------------------------- actor API

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        params = req.sampling_params
        first_only = replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))

        def add(engine: LLMEngine) -> None:
            request = engine.add_request(
                req.request_id,
                list(req.prompt_token_ids),
                first_only,
                priority=req.priority,
                deadline=deadline_to_monotonic(req.deadline),
                hold_kv=True,
            )
            self._pending[req.request_id] = _Pending(
                request, future, loop, time.monotonic(), params.max_tokens
            )

        try:
            try:
                await self.core.aengine.run(add)
            except InvalidRequestError as exc:  # what needs the engine (a grammar's syntax)
                raise WorkerRejectedError(exc.message, field=exc.field) from exc
            except ValueError as exc:
                raise WorkerRejectedError(str(exc)) from exc
            return await future
        finally:  # a kv_handle() call still waiting gets b"" (no-op once it had the handle)
            self._publish_early(req.request_id, b"")

    async def kv_handle(self, request_id: str) -> bytes:
        if not self.streams_kv:
            return b""
        if request_id in self._ended:
            return self._ended.pop(request_id)
        future = self._early.setdefault(request_id, asyncio.get_running_loop().create_future())
        try:
            return await future
        finally:
            self._early.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        await self.core.aengine.run(lambda engine: self._abort(engine, request_id))

    async def kv_leases(self) -> int:
        return await self.core.aengine.run(lambda e: self.sender.num_leased())

    def shutdown(self) -> None:
        self.sender.close()
        self.core.shutdown()

    # --------------------------------------------------- engine-thread side

    def _abort(self, engine: LLMEngine, request_id: str) -> None:
        """Whatever its status: out of the engine, its lease failed, its caller answered."""
        pending = self._pending.pop(request_id, None)
        engine.abort([request_id])
        # A lease outlives `_pending` (taken at the first token when not streamed): end it
        # whatever the status; the sender frees its blocks once no transfer reads them.
        self.sender.fail(request_id, "aborted")
        if pending is not None:
            pending.loop.call_soon_threadsafe(_reject, pending.future, "aborted")

    def _abort_all(self) -> int:
        """The router is lost: abort every request and lease as `abort` does; returns how many.
        Leases free their blocks on a later sender poll, once no transfer reads them."""
        request_ids = set(self._pending) | self._leased
        for request_id in request_ids:
            self._abort(self.core.engine, request_id)
        return len(request_ids)

    def _poll_sender(self) -> None:
        self.sender.poll()

    def _on_release(self, transfer_id: str, block_ids: list[int]) -> None:
        self._leased.discard(transfer_id)
        self.core.engine.release_blocks(block_ids)

    def _on_kv_enqueued(self, held: HeldKVEnqueued) -> None:
        """The prompt's last step is enqueued: lease its blocks now and hand out the handle."""
        rid = held.request.request_id
        pending = self._pending.get(rid)
        if pending is None:
            return
        try:
            pending.handle = self.sender.register(
                rid,
                held.block_ids,
                held.block_hashes,
                held.request.num_prompt_tokens,
                source_p2p_ranks=[self.kv_group.rank] if self.kv_group else None,
                layer_ready=held.layer_ready,
            ).to_bytes()
        except Exception:  # the step must go on: the handle then comes with the first token
            log.exception("kvtransfer: streaming the KV of %s failed", rid)
            return
        self._leased.add(rid)
        pending.status = PrefillStatus.KV_STREAMING
        pending.loop.call_soon_threadsafe(self._publish_early, rid, pending.handle)

    def _publish_early(self, request_id: str, handle: bytes) -> None:
        """On the actor's event loop: answers a waiting `kv_handle`, or keeps the answer for
        one to come (the first answer for an id stands)."""
        future = self._early.get(request_id)
        if future is not None:
            if not future.done():
                future.set_result(handle)
            return
        self._ended.setdefault(request_id, handle)
        while len(self._ended) > _ENDED_REMEMBERED:
            self._ended.popitem(last=False)

    def _on_output(self, out: RequestOutput) -> None:
        pending = self._pending.pop(out.request_id, None)
        if pending is None or not out.finished:
            return
        if out.error is not None:  # the engine failed it (its blocks are freed): no first token
            pending.loop.call_soon_threadsafe(_reject, pending.future, out.error)
            return
        request, engine = pending.request, self.core.engine
        first = out.new_token_ids[0]
        num_prompt = len(out.prompt_token_ids)
        ends_here = (
            out.finish_reason == "stop"
            or pending.real_max_tokens == 1
            or (num_prompt + 1 >= engine.max_model_len)
        )
        handle = b""
        if pending.status is PrefillStatus.KV_STREAMING:  # leased at the last step
            assert request.held_block_ids, f"{out.request_id}: streamed, but no blocks held"
            if ends_here:  # the lease frees the blocks once a transfer under way stopped reading
                self.sender.fail(out.request_id, "the request ended at its first token")
            else:
                handle = pending.handle
        elif ends_here:
            engine.release_blocks(request.held_block_ids)
        else:
            num_full = num_prompt // engine.config.block_size
            ranks = [self.kv_group.rank] if self.kv_group else None
            handle = self.sender.register(
                out.request_id,
                request.held_block_ids,
                request.block_hashes[:num_full],
                num_prompt,
                source_p2p_ranks=ranks,
            ).to_bytes()
            self._leased.add(out.request_id)
        started = request.first_scheduled_time or pending.submitted
        now = time.monotonic()
        result = PrefillResult(
            request_id=out.request_id,
            first_token_id=first,
            text_delta=out.text_delta,
            finished=ends_here,
            finish_reason=(out.finish_reason if out.finish_reason == "stop" else "length")
            if ends_here
            else None,
            kv_handle=handle,
            num_prompt_tokens=num_prompt,
            num_cached_tokens=out.num_cached_tokens,
            logprobs=out.logprobs[0] if out.logprobs else None,
            timings=StageTimes(prefill_queue=started - pending.submitted, prefill=now - started),
        )
        pending.loop.call_soon_threadsafe(_resolve, pending.future, result)


def _resolve(future: asyncio.Future, result: PrefillResult) -> None:
    if not future.done():
        future.set_result(result)


def _reject(future: asyncio.Future, reason: str) -> None:
    if not future.done():
        future.set_exception(WorkerRejectedError(reason))
