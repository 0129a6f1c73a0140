"""The registry's incarnation rule (router.registry, Restarts), with fake workers.

A worker whose snapshot shows a new incarnation was restarted: whatever was in flight on it
fails UNAVAILABLE, its bookings are given back (once), and only then is it HEALTHY again.
While it restarts (every call fails) it is UNHEALTHY and nothing is placed on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import pytest

from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.errors import ErrorKind, RequestError
from router.flow import Orchestrator
from router.policy import Demand, Placement, Rejection, place
from router.registry import Pool, WorkerRegistry
from router.request import GenerateRequest, OutputBatch
from router.slo import Slo
from tandem.testing.fake_worker import FailMode, FakeDelays, FakeWorker

SLO = Slo(ttft_s=None, tpot_s=None, best_effort=True, priority=0)
PROMPT = tuple(range(65, 105))  # 40 tokens


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 30))


async def registry_of() -> tuple[WorkerRegistry, FakeWorker]:
    registry = WorkerRegistry()
    await registry.add("p0", Pool.PREFILL, FakeWorker("p0"))
    decode = FakeWorker("d0")
    await registry.add("d0", Pool.DECODE, decode)
    return registry, decode


def place_one(registry: WorkerRegistry) -> Placement | Rejection:
    prefill = [e.view() for e in registry.healthy(Pool.PREFILL)]
    decode = [e.view() for e in registry.healthy(Pool.DECODE)]
    return place(prefill, decode, Demand(len(PROMPT), 40, SLO), {})


def booked(registry: WorkerRegistry, worker_id: str) -> tuple[int, int, int]:
    e = registry.get(worker_id)
    return e.pending_prefill_tokens, e.started_since_snapshot, e.reserved_blocks


def test_a_new_incarnation_fails_the_old_one_and_gives_back_its_bookings_once() -> None:
    async def body() -> None:
        registry, decode = await registry_of()
        downs: list[str] = []
        registry.on_worker_down(downs.append)
        plan = place_one(registry)
        assert isinstance(plan, Placement)
        reservation = registry.reserve(plan, len(PROMPT))
        reservation.end_prefill()
        reservation.mark_started()  # started, but no snapshot has shown it yet
        entry = registry.get("d0")
        old_down = entry.down
        assert old_down is not None and booked(registry, "d0")[2] > 0
        entry.prefix.record([b"h" * 16])

        decode.restart()
        await registry.heartbeat_once()

        assert old_down.done() and downs == ["d0"]  # in-flight work on d0 fails
        assert entry.healthy and entry.incarnation == "1" and registry.serving
        assert booked(registry, "d0") == (0, 0, 0) and len(entry.prefix) == 0
        reservation.release()  # the flow ends later: nothing is given back twice
        assert booked(registry, "d0") == (0, 0, 0) and booked(registry, "p0") == (0, 0, 0)

    run(body)


def test_the_same_incarnation_keeps_bookings_and_health() -> None:
    async def body() -> None:
        registry, _ = await registry_of()
        plan = place_one(registry)
        assert isinstance(plan, Placement)
        with registry.reserve(plan, len(PROMPT)):
            before = booked(registry, "d0")
            await registry.heartbeat_once()  # not marked started: the snapshot clears nothing
            assert booked(registry, "d0") == before and registry.get("d0").healthy
        assert booked(registry, "d0") == (0, 0, 0)

    run(body)


def test_a_restarting_worker_is_never_placed_on_until_it_is_back() -> None:
    async def body() -> None:
        registry, decode = await registry_of()
        decode.fail(FailMode.RAISE)  # the process died; Ray is restarting it
        await registry.heartbeat_once()
        assert not registry.get("d0").healthy and not registry.serving
        assert isinstance(place_one(registry), Rejection)
        decode.restart()
        await registry.heartbeat_once()
        assert registry.get("d0").healthy and registry.serving
        assert isinstance(place_one(registry), Placement)

    run(body)


def test_a_stream_on_a_worker_that_restarted_between_heartbeats_ends_unavailable() -> None:
    async def body() -> None:
        config = RouterConfig(max_model_len=512, heartbeat_interval_s=60, poll_wait_s=0.2)
        registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_timeout_s)
        orch = Orchestrator(registry, config)
        await orch.add_worker("p0", Pool.PREFILL, FakeWorker("p0"))
        decode = FakeWorker("d0", delays=FakeDelays(step_s=0.02))
        await orch.add_worker("d0", Pool.DECODE, decode)
        req = GenerateRequest(
            "r", PROMPT, SamplingParams(max_tokens=200), SLO, "", time.monotonic()
        )
        try:
            async with aclosing(orch.generate(req)) as stream:
                await stream.__anext__()  # the first token, from p0
                second: OutputBatch = await stream.__anext__()  # from d0: it has the request
                assert second.token_ids and decode.num_running == 1
                decode.restart()  # no failed heartbeat in between: only the token tells
                await registry.heartbeat_once()
                with pytest.raises(RequestError) as info:
                    async for _ in stream:
                        pass
            assert info.value.kind is ErrorKind.UNAVAILABLE
            assert registry.get("d0").healthy
            assert booked(registry, "d0") == (0, 0, 0)
        finally:
            await orch.close()
            for entry in registry.entries():
                await entry.handle.close()

    run(body)
