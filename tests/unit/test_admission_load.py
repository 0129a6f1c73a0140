"""Admission sees the load it admitted (issue 21, item 5): requests placed between two
heartbeats, or placed and still prefilling when a heartbeat comes, count in the decode worker's
predicted TPOT and KV headroom; a best-effort request with no KV room waits in the router queue
instead of failing on the worker. Pure registry + policy, and the flow with fake workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import pytest

from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.dispatch_gate import DispatchGate, RouterQueueFullError
from router.errors import ErrorKind, RequestError
from router.flow import Orchestrator
from router.policy import Demand, Placement, Rejection, place
from router.registry import Pool, Reservation, WorkerRegistry
from router.request import FinishReason, GenerateRequest, OutputBatch
from router.slo import DEFAULT_CLASS, DEFAULT_SLO_CLASSES, Slo
from tandem.contract.worker_api import CostModel
from tandem.testing.fake_worker import FakeDelays, FakeWorker

DEFAULT = DEFAULT_SLO_CLASSES[DEFAULT_CLASS]
DEFAULT_SLO = Slo(DEFAULT.ttft_s, DEFAULT.tpot_s, DEFAULT.best_effort, DEFAULT.priority)
BEST_EFFORT = Slo(None, None, True, 20)
# TPOT = 0.03 + 0.015 * batch: 4 in the batch -> 90 ms, 5 -> 105 ms (target: 100 ms)
DECODE_COST = CostModel(decode_step_s=0.03, decode_step_s_per_seq=0.015)
PROMPT = tuple(range(65, 65 + 40))  # 40 tokens; + 40 new = 80 tokens = 5 blocks of 16


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 30))


async def registry_of(decode_blocks: int = 4096) -> WorkerRegistry:
    registry = WorkerRegistry()
    await registry.add("p0", Pool.PREFILL, FakeWorker("p0"))
    decode = FakeWorker("d0", num_blocks=decode_blocks, cost=DECODE_COST)
    await registry.add("d0", Pool.DECODE, decode)
    return registry


def place_one(registry: WorkerRegistry, slo: Slo, new: int = 40) -> Placement | Rejection:
    views = [e.view() for e in registry.healthy(Pool.PREFILL)]
    decode = [e.view() for e in registry.healthy(Pool.DECODE)]
    return place(views, decode, Demand(len(PROMPT), new, slo), {})


def admit_all(registry: WorkerRegistry, slo: Slo, n: int) -> tuple[list[Reservation], list[Any]]:
    """Place and book up to `n` requests back to back; stop at the first rejection."""
    held: list[Reservation] = []
    outcomes: list[Any] = []
    for _ in range(n):
        plan = place_one(registry, slo)
        outcomes.append(plan)
        if isinstance(plan, Rejection):
            break
        held.append(registry.reserve(plan, len(PROMPT)))
    return held, outcomes


# -- TPOT -----------------------------------------------------------------------------------


def test_predicted_tpot_grows_with_each_admitted_request_until_one_is_rejected() -> None:
    async def body() -> None:
        registry = await registry_of()
        held, outcomes = admit_all(registry, DEFAULT_SLO, 10)
        assert len(held) == 4 and isinstance(outcomes[-1], Rejection)
        tpots = [o.decode.predicted_tpot_s for o in outcomes[:-1]]
        assert tpots == sorted(tpots) and len(set(tpots)) == 4  # grows with each admission
        assert "TPOT" in outcomes[-1].reason
        held[0].release()  # one ends: room for exactly one more
        assert isinstance(place_one(registry, DEFAULT_SLO), Placement)

    run(body)


def test_a_heartbeat_while_they_prefill_does_not_forget_them() -> None:
    """The root of the defect: the snapshot cannot show requests not yet started on the decode
    worker (queued or prefilling); a heartbeat used to clear their bookings anyway."""

    async def body() -> None:
        registry = await registry_of()
        held, _ = admit_all(registry, DEFAULT_SLO, 4)
        await registry.heartbeat_once()  # d0 has none of them yet
        assert registry.get("d0").started_since_snapshot == 4
        assert isinstance(place_one(registry, DEFAULT_SLO), Rejection)
        for reservation in held:  # started on the worker now ...
            reservation.mark_started()
        assert registry.get("d0").started_since_snapshot == 4  # ... shown by the next snapshot
        await registry.heartbeat_once()
        assert registry.get("d0").started_since_snapshot == 0
        for reservation in held:  # a release after the snapshot showed it gives nothing back
            reservation.release()
        assert registry.get("d0").started_since_snapshot == 0

    run(body)


# -- KV headroom ----------------------------------------------------------------------------


def test_kv_booked_until_released_then_the_next_fits() -> None:
    async def body() -> None:
        registry = await registry_of(decode_blocks=20)  # room for 4 sequences of 5 blocks
        held, outcomes = admit_all(registry, BEST_EFFORT, 10)
        assert len(held) == 4 and registry.get("d0").view().free_blocks == 0
        waiting = outcomes[-1]
        assert isinstance(waiting, Rejection) and waiting.no_room  # best-effort: may wait
        refused = place_one(registry, DEFAULT_SLO)
        assert isinstance(refused, Rejection) and refused.no_room  # the flow refuses SLO ones
        await registry.heartbeat_once()  # none started: still booked
        assert registry.get("d0").view().free_blocks == 0
        held[0].release()
        assert isinstance(place_one(registry, BEST_EFFORT), Placement)

    run(body)


def test_a_sequence_larger_than_any_worker_is_not_worth_waiting_for() -> None:
    async def body() -> None:
        registry = await registry_of(decode_blocks=4)
        rejected = place_one(registry, BEST_EFFORT, new=100)
        assert isinstance(rejected, Rejection) and not rejected.no_room

    run(body)


def test_parked_requests_count_in_the_queue_bound_and_wake_on_room() -> None:
    async def body() -> None:
        gate = DispatchGate(capacity=1, max_queue=2, starvation_s=5.0)
        parked = [asyncio.ensure_future(gate.wait_for_room()) for _ in range(2)]
        await asyncio.sleep(0)
        assert gate.num_waiting == gate.num_parked == 2
        with pytest.raises(RouterQueueFullError):
            await gate.wait_for_room()
        gate.room_freed()
        await asyncio.gather(*parked)
        assert gate.num_waiting == 0
        cancelled = asyncio.ensure_future(gate.wait_for_room())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert gate.num_parked == 0

    run(body)


# -- the flow -------------------------------------------------------------------------------

CONFIG = RouterConfig(
    max_model_len=512, heartbeat_interval_s=0.02, poll_wait_s=0.2, poll_grace_s=0.3
)


def request(rid: str, slo: Slo, max_tokens: int = 8) -> GenerateRequest:
    params = SamplingParams(max_tokens=max_tokens)
    return GenerateRequest(rid, PROMPT, params, slo, "best_effort", time.monotonic())


async def collect(orch: Orchestrator, req: GenerateRequest) -> list[OutputBatch]:
    async with aclosing(orch.generate(req)) as batches:
        return [batch async for batch in batches]


async def small_cluster(config: RouterConfig = CONFIG) -> tuple[Orchestrator, WorkerRegistry]:
    """d0 holds 4 sequences of 40 + 8 tokens (3 blocks each); prefills span heartbeats."""
    registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_timeout_s)
    orch = Orchestrator(registry, config)
    await orch.add_worker("p0", Pool.PREFILL, FakeWorker("p0", delays=FakeDelays(prefill_s=0.05)))
    d0 = FakeWorker("d0", num_blocks=12, delays=FakeDelays(step_s=0.01))
    await orch.add_worker("d0", Pool.DECODE, d0)
    return orch, registry


async def close(orch: Orchestrator, registry: WorkerRegistry) -> None:
    await registry.stop()
    await orch.close()
    for entry in registry.entries():
        await entry.handle.close()


def test_a_best_effort_burst_larger_than_the_decode_kv_all_completes() -> None:
    async def body() -> None:
        orch, registry = await small_cluster()
        registry.start()  # heartbeats come while requests prefill
        most_parked = 0

        async def watch() -> None:
            nonlocal most_parked
            while True:
                most_parked = max(most_parked, orch.num_queued)
                await asyncio.sleep(0.002)

        watcher = asyncio.ensure_future(watch())
        try:
            burst = [collect(orch, request(f"b{i}", BEST_EFFORT)) for i in range(12)]
            results = await asyncio.gather(*burst)
        finally:
            watcher.cancel()
            await close(orch, registry)
        for batches in results:
            summary = batches[-1].summary
            assert summary is not None and summary.finish_reason is FinishReason.LENGTH
            assert summary.num_completion_tokens == 8
        assert most_parked > 0  # some waited in the router queue
        d = registry.get("d0")
        assert (d.started_since_snapshot, d.reserved_blocks) == (0, 0)

    run(body)


def test_an_slo_request_without_kv_room_is_refused_and_a_parked_one_can_be_aborted() -> None:
    async def body() -> None:
        orch, registry = await small_cluster()
        long = orch.generate(request("long", BEST_EFFORT, max_tokens=100))  # 9 of 12 blocks
        try:
            await long.__anext__()
            slo = Slo(ttft_s=None, tpot_s=None, best_effort=False, priority=0)
            with pytest.raises(RequestError) as info:  # 7 blocks: refused, not parked
                await collect(orch, request("slo", slo, max_tokens=60))
            assert info.value.kind is ErrorKind.RESOURCE_EXHAUSTED and orch.num_queued == 0
            parked = asyncio.ensure_future(collect(orch, request("be", BEST_EFFORT, 60)))
            deadline = time.monotonic() + 3
            while orch.num_queued == 0:
                assert time.monotonic() < deadline, "the best-effort request did not park"
                await asyncio.sleep(0.005)
            assert orch.abort("be")
            summary = (await parked)[-1].summary
            assert summary is not None and summary.finish_reason is FinishReason.ABORT
            assert orch.num_queued == 0
        finally:
            await long.aclose()
            await close(orch, registry)

    run(body)
