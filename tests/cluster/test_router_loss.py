"""A lost router's requests are aborted by the workers it left (tandem.pool.router_watch).

The real prefill, decode and colocated workers in one process (no Ray; the gRPC KV transport
on CPU), with a short `router_timeout_s`. The test plays the router: a heartbeat task calls
`load()` as the router's registry does, and stopping it is the router dying. Block counts are
read on the engine thread directly, since a `load()` would be a router call."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import ray

from decode_worker.arrivals import ArrivalStatus
from decode_worker.worker import DecodeWorker
from engine import SamplingParams
from engine.worker_stats import engine_load
from prefill_worker.worker import PrefillWorker
from tandem.cluster import ClusterConfig
from tandem.contract.worker_api import (
    DecodeRequest,
    PrefillRequest,
    StepOutput,
    WorkerRejectedError,
)
from tandem.pool.colocated import ColocatedWorker
from tandem.pool.router_watch import RouterWatch
from tests.cluster.cluster_harness import ClusterThread

ENGINE = dict(model="preset:tiny", device="cpu", load_format="dummy")
PROMPT = tuple((13 * i + 7) % 500 for i in range(70))
LONG = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)  # runs past the test
SHORT = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
TIMEOUT_S = 0.5
Worker = PrefillWorker | DecodeWorker | ColocatedWorker


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 60))


async def blocks_in_use(w: Worker) -> int:
    """Not through `load()`: that is a router call and would reset the watch."""
    load = await w.core.aengine.run(engine_load)
    return load.num_total_blocks - load.num_free_blocks


async def until(cond: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await cond():
        assert time.monotonic() < deadline, f"{what}: not within {within_s}s"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def router(*workers: Worker) -> AsyncIterator[None]:
    """A live router while inside: every worker's `load()` every 0.1 s (the real one: 0.5 s)."""

    async def beat() -> None:
        while True:
            await asyncio.gather(*(w.load() for w in workers))
            await asyncio.sleep(0.1)

    task = asyncio.ensure_future(beat())
    try:
        yield
    finally:  # the router dies
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def outputs_until_finished(d: DecodeWorker | ColocatedWorker, rid: str) -> list[StepOutput]:
    got: list[StepOutput] = []
    while not (got and got[-1].finished):
        got += [o for o in await d.next_outputs(5.0) if o.request_id == rid]
    return got


async def disaggregated(p: PrefillWorker, d: DecodeWorker, rid: str, params: Any) -> None:
    """The router's streamed handshake: the decode side receives before the first token."""
    prefill = asyncio.ensure_future(p.prefill(PrefillRequest(rid, PROMPT, params)))
    await d.start(DecodeRequest(rid, PROMPT, None, await p.kv_handle(rid), params))
    result = await prefill
    await d.start(DecodeRequest(rid, PROMPT, result.first_token_id, b"", params))


@pytest.fixture()
def pair() -> Any:
    kw: dict[str, Any] = dict(calibrate=False, metrics_port=None, router_timeout_s=TIMEOUT_S)
    p = PrefillWorker("p", dict(ENGINE), **kw)
    d = DecodeWorker("d", dict(ENGINE), swap_cpu_bytes=0, **kw)
    yield p, d
    p.shutdown()
    d.shutdown()


def test_lost_router_frees_every_state_and_a_new_router_is_served(pair: Any) -> None:
    p, d = pair

    async def body() -> None:
        async with router(p, d):
            await disaggregated(p, d, "running", LONG)  # decode: RUNNING
            # KV landed, first token never sent: decode KV_LANDED, prefill's lease unacked
            prefill = asyncio.ensure_future(p.prefill(PrefillRequest("landed", PROMPT, LONG)))
            await d.start(DecodeRequest("landed", PROMPT, None, await p.kv_handle("landed"), LONG))
            await prefill
            # a prefill whose decode side never came: its lease waits for an ack
            await p.prefill(PrefillRequest("leased", PROMPT, LONG))
            landed = ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN
            await until(lambda: _true(d._arrivals.status("landed") is landed), 10, "landed KV")
            assert d._arrivals.status("running") is ArrivalStatus.RUNNING
            assert await p.kv_leases() >= 1
            assert await blocks_in_use(p) > 0 and await blocks_in_use(d) > 0
        lost_at = time.monotonic()
        await until(lambda: _true(_losses(p) == _losses(d) == 1), 10, "the router's loss noticed")
        await until(lambda: _zero(blocks_in_use(p)), 10, "prefill freed")
        await until(lambda: _zero(blocks_in_use(d)), 10, "decode freed")
        await until(lambda: _zero(p.kv_leases()), 10, "prefill leases ended")
        assert time.monotonic() - lost_at < TIMEOUT_S + 5.0
        assert len(d._arrivals) == 0 and not p._pending and not p._leased
        for w in (p, d):
            assert w.core.router_watch is not None and w.core.router_watch.num_losses == 1
            await w.core.aengine.run(lambda e: e.kv_manager.pool.check_integrity())

        async with router(p, d):  # a new router: its calls restart the clock, it is served
            await disaggregated(p, d, "after", SHORT)
            outs = await outputs_until_finished(d, "after")
            assert outs[-1].error is None and sum(len(o.new_token_ids) for o in outs) == 3
            await until(lambda: _zero(p.kv_leases()), 10, "the new lease acked")
        for w in (p, d):
            assert w.core.router_watch is not None and w.core.router_watch.num_losses == 1

    run(body)


def test_lost_router_answers_a_waiting_prefill_and_its_handle_caller() -> None:
    """A prefill the router still awaits when the watch fires gets "aborted", not a hang."""

    async def body() -> None:
        p = PrefillWorker(
            "p", dict(ENGINE), calibrate=False, metrics_port=None, router_timeout_s=TIMEOUT_S
        )
        try:
            await p.load()  # the router's first call starts the clock
            # Hold the engine thread past the timeout, so the prefill is still queued then.
            blocker = p.core.aengine.run(lambda e: time.sleep(TIMEOUT_S + 0.3))
            prefill = asyncio.ensure_future(p.prefill(PrefillRequest("q", PROMPT, LONG)))
            await blocker
            with pytest.raises(WorkerRejectedError, match="aborted"):
                await asyncio.wait_for(prefill, 10)
            assert await p.kv_handle("q") == b""
            await until(lambda: _zero(blocks_in_use(p)), 10, "prefill freed")
        finally:
            p.shutdown()

    run(body)


def test_colocated_worker_aborts_a_lost_routers_requests_but_never_without_a_router() -> None:
    async def body() -> None:
        c = ColocatedWorker(
            "c", dict(ENGINE), calibrate=False, metrics_port=None, router_timeout_s=TIMEOUT_S
        )
        try:
            await c.submit(PrefillRequest("before", PROMPT, LONG))  # no router call yet
            await asyncio.sleep(3 * TIMEOUT_S)
            assert await blocks_in_use(c) > 0, "a worker that never heard a router aborted"
            await c.abort("before")

            await c.next_outputs(0.01)  # a router: the long poll is a call too
            await c.submit(PrefillRequest("orphan", PROMPT, LONG))
            watch = c.core.router_watch
            assert watch is not None
            await until(lambda: _true(watch.num_losses == 1), 10, "the router's loss noticed")
            await until(lambda: _zero(blocks_in_use(c)), 10, "colocated freed")
            assert not c._requests

            await c.next_outputs(0.01)  # a new router
            await c.submit(PrefillRequest("after", PROMPT, SHORT))
            outs = await outputs_until_finished(c, "after")
            assert outs[-1].error is None and sum(len(o.new_token_ids) for o in outs) == 4
        finally:
            c.shutdown()

    run(body)


def test_watch_fires_once_per_loss_and_only_after_a_call() -> None:
    now = [0.0]
    aborted: list[int] = []

    def abort_all() -> int:
        aborted.append(1)
        return 3

    watch = RouterWatch(10.0, abort_all, lambda: 0, clock=lambda: now[0])
    now[0] = 100.0
    assert watch.check() == 0 and not aborted  # never heard a router
    watch.heard()
    now[0] = 110.0
    assert watch.check() == 0  # exactly the timeout: not yet
    now[0] = 110.5
    assert watch.check() == 3 and watch.check() == 0 and aborted == [1]
    watch.heard()
    now[0] = 121.0
    assert watch.check() == 3 and watch.num_losses == 2
    with pytest.raises(ValueError, match="router_timeout_s"):
        RouterWatch(0.0, lambda: 0, lambda: 0)


def _losses(w: Worker) -> int:
    assert w.core.router_watch is not None
    return w.core.router_watch.num_losses


async def _true(value: bool) -> bool:
    return value


async def _zero(value: Awaitable[int]) -> bool:
    return await value == 0


def test_workers_of_a_hung_router_free_its_streams_kv() -> None:
    """The real cluster (Ray actors, the gRPC router in this process): the router's event loop
    blocks, as a hung or dead router process would, while two streams decode; both workers
    abort what it sent and every block comes back, with no call from the router."""
    cluster = ClusterThread(
        ClusterConfig(engine_kwargs={"device": "cpu"}, calibrate=False, router_timeout_s=1.0)
    )
    streams: list[Any] = [  # generators: `close()` cancels the call
        cluster.client.generate("The router went away. " * 8, max_tokens=1500, ignore_eos=True)
        for _ in range(2)
    ]
    try:
        for stream in streams:
            next(stream)  # decoding
        actors = cluster.cluster.actors
        decode = next(a for w, a in actors.items() if cluster.cluster.pools[w] == "decode")
        load = ray.get(decode.load.remote(), timeout=10)
        assert load.num_free_blocks < load.num_total_blocks
        hung = asyncio.run_coroutine_threadsafe(_block_loop(6.0), cluster.loop)
        deadline = time.monotonic() + 5.5
        for actor in actors.values():  # `counters` is no router call: the clock runs on
            while ray.get(actor.counters.remote(), timeout=10)["router_losses"] < 1:
                assert time.monotonic() < deadline, "the router's loss went unnoticed"
                time.sleep(0.05)
        for actor in actors.values():
            load = ray.get(actor.load.remote(), timeout=10)
            assert load.num_free_blocks == load.num_total_blocks
        hung.result(timeout=10)
    finally:
        for stream in streams:
            stream.close()
        cluster.close()


async def _block_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocks the router's event loop: no heartbeat, no poll, no abort
