"""The request flow without a transport: plain requests in, plain batches and a summary out,
RequestErrors by kind, and the registry's bookings that every way out gives back (in-process
fake workers, no gRPC, no Ray)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import pytest

from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.errors import ErrorKind, RequestError
from router.flow import Orchestrator
from router.policy import DecodeChoice, Placement, PrefillChoice
from router.registry import Pool, WorkerEntry, WorkerRegistry
from router.request import FinishReason, GenerateRequest, OutputBatch
from router.slo import Slo
from tandem.contract.worker_api import CostModel
from tandem.testing.fake_worker import FailMode, FakeDelays, FakeWorker

NO_SLO = Slo(ttft_s=None, tpot_s=None, best_effort=False, priority=0)
PROMPT = tuple(range(65, 65 + 40))  # 40 tokens: 3 blocks of 16
CONFIG = RouterConfig(
    max_model_len=512, heartbeat_interval_s=0.25, poll_wait_s=0.2, poll_grace_s=0.3
)


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 20))


def request(rid: str | None = None, max_tokens: int = 8, slo: Slo = NO_SLO) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens)
    return GenerateRequest(rid, PROMPT, params, slo, "interactive", time.monotonic())


@asynccontextmanager
async def orchestrator(
    workers: dict[str, tuple[Pool, FakeWorker]],
) -> AsyncIterator[tuple[Orchestrator, WorkerRegistry]]:
    """No heartbeat loop: a snapshot comes only when a test asks (`heartbeat_once`)."""
    registry = WorkerRegistry(CONFIG.heartbeat_interval_s, CONFIG.heartbeat_timeout_s)
    orch = Orchestrator(registry, CONFIG)
    for wid, (pool, worker) in workers.items():
        await orch.add_worker(wid, pool, worker)
    try:
        yield orch, registry
    finally:
        await orch.close()
        for _, worker in workers.values():
            await worker.close()


def pd(prefill_s: float = 0.0, step_s: float = 0.0) -> dict[str, tuple[Pool, FakeWorker]]:
    return {
        "p0": (Pool.PREFILL, FakeWorker("p0", delays=FakeDelays(prefill_s=prefill_s))),
        "d0": (Pool.DECODE, FakeWorker("d0", delays=FakeDelays(step_s=step_s))),
    }


def booked(entry: WorkerEntry) -> tuple[int, int, int]:
    return entry.pending_prefill_tokens, entry.started_since_snapshot, entry.reserved_blocks


async def collect(orch: Orchestrator, req: GenerateRequest) -> list[OutputBatch]:
    async with aclosing(orch.generate(req)) as batches:
        return [batch async for batch in batches]


def ids(calls: list[str]) -> list[str]:
    """The callers' request ids of a fake worker's calls (workers see `router.attempt.attempt_id`)."""
    return [call.rsplit("#", 1)[0] for call in calls]


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- plain outputs --------------------------------------------------------------------------


def test_disaggregated_request_yields_plain_batches_and_a_summary() -> None:
    async def body() -> None:
        async with orchestrator(pd()) as (orch, registry):
            batches = await collect(orch, request("r-1", max_tokens=12))
            assert all(type(b) is OutputBatch and b.request_id == "r-1" for b in batches)
            assert [b.is_final for b in batches] == [False] * (len(batches) - 1) + [True]
            tokens = [t for b in batches for t in b.token_ids]
            assert tokens == list(PROMPT[:12])
            assert "".join(b.text_delta for b in batches) == "ABCDEFGHIJKL"
            summary = batches[-1].summary
            assert summary is not None and summary.finish_reason is FinishReason.LENGTH
            assert summary.num_prompt_tokens == 40 and summary.num_completion_tokens == 12
            t = summary.timings
            stages = (t.router_queue, t.prefill_queue, t.prefill, t.kv_transfer, t.decode_queue)
            assert None not in stages and t.decode is not None
            assert min(*stages, t.decode) >= 0  # durations: none negative
            assert 0 < t.time_to_first_token <= t.end_to_end
            assert orch.num_active == 0
            assert booked(registry.get("p0")) == booked(registry.get("d0")) == (0, 0, 0)

    run(body)


def test_abort_ends_with_finish_reason_abort() -> None:
    async def body() -> None:
        async with orchestrator(pd(step_s=0.01)) as (orch, registry):
            batches: list[OutputBatch] = []

            async def consume() -> None:
                async with aclosing(orch.generate(request("victim", max_tokens=400))) as stream:
                    async for batch in stream:
                        batches.append(batch)

            task = asyncio.ensure_future(consume())
            await until(lambda: len(batches) >= 2)
            assert orch.abort("victim") and not orch.abort("nobody")
            await task
            summary = batches[-1].summary
            assert summary is not None and summary.finish_reason is FinishReason.ABORT
            assert booked(registry.get("d0")) == (0, 0, 0)

    run(body)


# -- errors by kind -------------------------------------------------------------------------


def test_refusals_are_resource_exhausted_with_a_retry_hint_and_book_nothing() -> None:
    async def body() -> None:
        slow = CostModel(prefill_s_per_token=0.1)  # 40 tokens -> 4 s predicted TTFT
        workers = {
            "p0": (Pool.PREFILL, FakeWorker("p0", cost=slow)),
            "d0": (Pool.DECODE, FakeWorker("d0")),
        }
        async with orchestrator(workers) as (orch, registry):
            tight = Slo(ttft_s=0.05, tpot_s=None, best_effort=False, priority=0)
            with pytest.raises(RequestError) as info:
                await collect(orch, request(slo=tight))
            err = info.value
            assert err.kind is ErrorKind.RESOURCE_EXHAUSTED and err.reason == "slo_infeasible"
            assert err.retry_after_s == CONFIG.heartbeat_interval_s and "TTFT" in err.details
            assert workers["p0"][1].prefills == [] and booked(registry.get("p0")) == (0, 0, 0)

    run(body)


def test_no_workers_is_unavailable_and_a_duplicate_id_already_exists() -> None:
    async def body() -> None:
        async with orchestrator({}) as (orch, _):
            with pytest.raises(RequestError) as info:
                await collect(orch, request())
            assert info.value.kind is ErrorKind.UNAVAILABLE and info.value.reason == "no_workers"
        async with orchestrator(pd(step_s=0.01)) as (orch, _):
            first = orch.generate(request("same", max_tokens=400))
            await first.__anext__()
            with pytest.raises(RequestError) as info:
                await collect(orch, request("same"))
            assert info.value.kind is ErrorKind.ALREADY_EXISTS
            await first.aclose()

    run(body)


def test_a_worker_failure_is_unavailable() -> None:
    async def body() -> None:
        workers = pd()
        async with orchestrator(workers) as (orch, registry):
            workers["p0"][1].fail(FailMode.RAISE)
            with pytest.raises(RequestError) as info:
                await collect(orch, request())
            assert info.value.kind is ErrorKind.UNAVAILABLE and info.value.reason is None
            assert booked(registry.get("p0")) == booked(registry.get("d0")) == (0, 0, 0)

    run(body)


# -- bookings -------------------------------------------------------------------------------


def test_bookings_are_held_while_prefilling_and_given_back_in_parts() -> None:
    async def body() -> None:
        async with orchestrator(pd(prefill_s=0.3, step_s=0.01)) as (orch, registry):
            p, d = registry.get("p0"), registry.get("d0")
            stream = orch.generate(request("r", max_tokens=50))
            first = asyncio.ensure_future(stream.__anext__())
            await until(lambda: p.pending_prefill_tokens > 0)
            assert booked(p) == (40, 0, 0) and booked(d) == (0, 1, 6)  # 40 + 50 tokens: 6 blocks
            await first
            assert booked(p) == (0, 0, 0) and booked(d) == (0, 1, 6)  # prefill done, decode held
            await stream.aclose()  # the caller leaves: aborted on the workers, all given back
            assert booked(d) == (0, 0, 0)
            await until(lambda: all("r" in ids(e.handle.aborts) for e in (p, d)))

    run(body)


def test_a_snapshot_clears_the_decode_booking_and_a_later_release_leaves_it() -> None:
    async def body() -> None:
        async with orchestrator(pd(step_s=0.01)) as (orch, registry):
            d = registry.get("d0")
            stream = orch.generate(request("r", max_tokens=50))
            await stream.__anext__()  # the first token: not yet started on the decode worker
            assert booked(d) == (0, 1, 6)
            await registry.heartbeat_once()  # its snapshot cannot show the request yet
            assert booked(d) == (0, 1, 6)
            await stream.__anext__()  # decoding: started there
            await registry.heartbeat_once()  # the snapshot shows the request now
            assert booked(d) == (0, 0, 0)
            other = orch.generate(request("s", max_tokens=50))
            await other.__anext__()
            assert booked(d) == (0, 1, 6)
            await stream.aclose()  # booked before the snapshot: nothing of it is left to give
            assert booked(d) == (0, 1, 6)
            await other.aclose()
            assert booked(d) == (0, 0, 0)

    run(body)


def test_colocated_books_the_prompt_until_its_first_token() -> None:
    async def body() -> None:
        worker = FakeWorker("c0", delays=FakeDelays(prefill_s=0.2, step_s=0.01))
        async with orchestrator({"c0": (Pool.COLOCATED, worker)}) as (orch, registry):
            c = registry.get("c0")
            stream = orch.generate(request("c", max_tokens=20))
            first = asyncio.ensure_future(stream.__anext__())
            await until(lambda: c.pending_prefill_tokens > 0)
            assert booked(c) == (40, 1, 0)
            batch = await first
            assert batch.token_ids and booked(c) == (0, 1, 0)
            rest = [b async for b in stream]
            assert rest[-1].summary is not None and rest[-1].summary.num_completion_tokens == 20
            assert booked(c) == (0, 0, 0)

    run(body)


def test_reservation_parts_are_given_back_once() -> None:
    async def body() -> None:
        registry = WorkerRegistry()
        await registry.add("p0", Pool.PREFILL, FakeWorker("p0"))
        await registry.add("d0", Pool.DECODE, FakeWorker("d0"))
        p, d = registry.get("p0"), registry.get("d0")
        plan = Placement(PrefillChoice("p0", 0.1, 16), DecodeChoice("d0", 0.01, num_blocks=7))
        with registry.reserve(plan, num_prompt_tokens=40) as reservation:
            assert booked(p) == (24, 0, 0) and booked(d) == (0, 1, 7)  # the uncached prompt
            reservation.end_prefill()
            reservation.end_prefill()
            assert booked(p) == (0, 0, 0) and booked(d) == (0, 1, 7)
        assert booked(d) == (0, 0, 0)
        reservation.release()
        assert booked(p) == booked(d) == (0, 0, 0)
        with pytest.raises(RuntimeError), registry.reserve(plan, 40):
            raise RuntimeError("the request failed")
        assert booked(p) == booked(d) == (0, 0, 0)
        views = {v.worker_id: v for v in (p.view(), d.view())}
        assert views["d0"].free_blocks == d.load.num_free_blocks

    run(body)
