"""A client cancel at every point of a request's way through the real cluster (Ray actors, the
gRPC router, tiny-random on CPU, KV streamed over gRPC while the prefill computes) gives every
KV block of both pools back; so does a request id used again once its request ended.

The router runs in this process: a worker's handle in its registry is wrapped (`Tripwire`) so
that a test knows when a request reached a worker call, and can hold it there."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from router.dispatch_gate import DispatchGate
from tandem.client import AsyncClient
from tandem.cluster import ClusterConfig
from tests.cluster.cluster_harness import ClusterThread

LONG = dict(max_tokens=400, ignore_eos=True)
PROMPT = "Blocks of the cache move between the pools. " * 12


@pytest.fixture(scope="module")
def cluster():
    # overlap scheduling as on CUDA (off by default on the CPU): cancels land while a step is
    # in flight
    kwargs = {"device": "cpu", "async_scheduling": True}
    c = ClusterThread(ClusterConfig(num_prefill=1, num_decode=1, engine_kwargs=kwargs))
    yield c
    c.close()


class Tripwire:
    """A worker handle whose next call of an armed method (`when` its arguments match) sets
    `reached`: held before it is sent until `hold` is set, or once it was sent to the worker
    ("sent"), or once the worker answered ("answered")."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._armed: dict[str, tuple[threading.Event, Any, Callable[..., bool]]] = {}

    def arm(
        self,
        method: str,
        at: str | asyncio.Event,
        when: Callable[..., bool] = lambda *args: True,
    ) -> threading.Event:
        reached = threading.Event()
        self._armed[method] = (reached, at, when)
        return reached

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.inner, name)
        if name not in self._armed:
            return call

        async def tripped(*args: Any) -> Any:
            reached, at, when = self._armed[name]
            if not when(*args):
                return await call(*args)
            del self._armed[name]
            if isinstance(at, asyncio.Event):
                reached.set()
                await at.wait()
                return await call(*args)
            sent = asyncio.ensure_future(call(*args))
            await asyncio.sleep(0)  # its first step sends the Ray actor call
            if at == "sent":
                reached.set()
            try:
                return await sent
            finally:
                reached.set()

        return tripped


@pytest.fixture()
def wires(cluster):
    """Tripwires on both workers' handles in the router, taken off after the test."""
    registry = cluster.cluster.server.registry
    entries = [registry.get("prefill-0"), registry.get("decode-0")]
    for entry in entries:
        entry.handle = Tripwire(entry.handle)
    yield entries[0].handle, entries[1].handle
    for entry in entries:
        entry.handle = entry.handle.inner


def settled(cluster: ClusterThread) -> bool:
    """Every block of both pools free, in load snapshots taken after the request settled."""
    time.sleep(1.0)  # the router's abort is fire-and-forget; a snapshot is a heartbeat (0.5 s)
    return cluster.wait_all_free(10)


def client_run(cluster: ClusterThread, body: Callable[[AsyncClient], Coroutine[Any, Any, Any]]):
    async def main() -> Any:
        client = AsyncClient(cluster.address)
        try:
            return await asyncio.wait_for(body(client), 60)
        finally:
            await client.close()

    return asyncio.run(main())


async def cancel_when(reached: threading.Event, stream: asyncio.Future[Any]) -> None:
    """Cancel the call once `reached` is set (it must be, within 30 s)."""
    assert await asyncio.to_thread(reached.wait, 30), "the request never reached the point"
    stream.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stream


async def consume(client: AsyncClient, **kw: Any) -> int:
    n = 0
    async for msg in client.generate(PROMPT, **{**LONG, **kw}):
        n += len(msg.token_ids)
    return n


def test_cancel_before_admission(cluster) -> None:
    async def body(client: AsyncClient) -> None:
        for _ in range(5):
            stream = asyncio.ensure_future(consume(client))
            await asyncio.sleep(0)
            stream.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stream

    client_run(cluster, body)
    assert settled(cluster)


def test_cancel_in_the_router_queue(cluster, wires) -> None:
    prefill, _ = wires
    orch = cluster.cluster.server.orchestrator
    saved = orch._gate
    orch._gate = DispatchGate(1, 16, 5.0)  # one request in its prefill stage at a time
    hold = asyncio.Event()
    reached = prefill.arm("prefill", hold)  # the first request holds the only slot

    async def body(client: AsyncClient) -> None:
        first = asyncio.ensure_future(consume(client, max_tokens=4))
        assert await asyncio.to_thread(reached.wait, 30)
        queued = asyncio.ensure_future(consume(client))
        while orch.num_queued == 0:
            await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        deadline = time.monotonic() + 10
        while orch.num_queued:  # the server hears of the cancel a moment later
            assert time.monotonic() < deadline, "the cancelled request stayed queued"
            await asyncio.sleep(0.01)
        cluster.loop.call_soon_threadsafe(hold.set)
        assert await first == 4

    try:
        client_run(cluster, body)
    finally:
        orch._gate = saved
    assert settled(cluster)


def test_cancel_during_prefill(cluster, wires) -> None:
    prefill, _ = wires
    reached = prefill.arm("prefill", "sent")

    async def body(client: AsyncClient) -> None:
        await cancel_when(reached, asyncio.ensure_future(consume(client)))

    client_run(cluster, body)
    assert settled(cluster)


def test_cancel_during_the_kv_transfer(cluster, wires) -> None:
    _, decode = wires
    # The decode worker's first start begins the transfer: with the KV handle while the prefill
    # runs (streamed) or, when the prefill ends before its handle is out, with the first token.
    # Either is "during the KV transfer"; waiting for the streamed one alone raced the prefill.
    reached = decode.arm("start", "answered", lambda req: True)

    async def body(client: AsyncClient) -> None:
        await cancel_when(reached, asyncio.ensure_future(consume(client)))

    client_run(cluster, body)
    assert settled(cluster)


def test_cancel_right_after_the_first_token(cluster) -> None:
    """The decode worker has the request's KV streaming in (or landed) and no first token yet:
    a cancel that meets the transfer's last write, or its end, must still free its blocks."""

    async def body(client: AsyncClient) -> None:
        for i in range(40):  # each cancel meets the transfer's last write or end by chance
            stream = client.generate(f"{i} {PROMPT}", **LONG)
            await stream.__anext__()
            await stream.aclose()

    client_run(cluster, body)
    assert settled(cluster)


def test_cancel_mid_decode(cluster) -> None:
    async def body(client: AsyncClient) -> None:
        stream = client.generate(PROMPT, **LONG)
        for _ in range(4):
            await stream.__anext__()
        await stream.aclose()

    client_run(cluster, body)
    assert settled(cluster)


def test_a_request_id_used_again_once_its_request_ended(cluster) -> None:
    for _ in range(3):
        text, final = cluster.client.generate_text(
            PROMPT, request_id="again", max_tokens=8, ignore_eos=True
        )
        assert final.completion_tokens == 8 and final.request_id == "again"
    assert settled(cluster)
