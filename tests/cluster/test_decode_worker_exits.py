"""Every way out of every status of the real decode worker frees what the status held (the
engine on CPU, in one process; a scripted KV receiver decides when a transfer lands or fails,
and hands the destination blocks back through `on_release` as a transport would)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from decode_worker.arrivals import ArrivalStatus
from decode_worker.worker import DecodeWorker
from engine import SamplingParams
from engine.utils.math import cdiv
from kvtransfer.handle import KVHandle, KVLayout
from kvtransfer.interfaces import KVPoll
from tandem.contract.worker_api import DecodeRequest, StepOutput, WorkerRejectedError

ENGINE = {"model": "preset:tiny", "device": "cpu", "load_format": "dummy"}
PROMPT = tuple((7 * i + 3) % 500 for i in range(40))
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
AWAITING_KV = ArrivalStatus.AWAITING_KV
KV_LANDED = ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN
RUNNING = ArrivalStatus.RUNNING


class ScriptedReceiver:
    """A KV receiver whose transfers stay WAITING until the test lands or fails them. Cancel and
    failure give the destination blocks back through `on_release`, as the transports do.

    `cancel_meets` scripts what a cancel finds, as the transports' threads can leave it:
    "waiting" (nothing lands: the blocks come back inside the cancel), "a write" (one is
    landing: the transfer reads TRANSFERRING and its blocks come back on the second poll after
    the cancel, any id's poll, once the write stopped) or "its end" (its last block landed just
    before: the cancel is a no-op and the transfer reads DONE)."""

    def __init__(self, on_release: Callable[[str, list[int]], None]) -> None:
        self._on_release = on_release
        self.states: dict[str, KVPoll] = {}
        self._blocks: dict[str, list[int]] = {}
        self.cancelled: list[str] = []
        self.cancel_meets = "waiting"
        self._draining: dict[str, int] = {}  # transfer id -> polls until its write stopped

    def start(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> None:
        if handle.transfer_id in self.states:  # as the transports do: they remember each id
            raise ValueError(f"transfer_id: {handle.transfer_id!r} already started")
        self.states[handle.transfer_id] = KVPoll.WAITING
        self._blocks[handle.transfer_id] = list(dst_block_ids)

    def poll(self, transfer_id: str) -> KVPoll:
        for tid, polls in list(self._draining.items()):
            self._draining[tid] = polls - 1
            if polls == 1:
                del self._draining[tid]
                self.states[tid] = KVPoll.FAILED
        state = self.states.get(transfer_id, KVPoll.FAILED)
        if state is KVPoll.FAILED and transfer_id in self._blocks:
            self._on_release(transfer_id, self._blocks.pop(transfer_id))
        return state

    def failure_reason(self, transfer_id: str) -> str | None:
        return "scripted failure" if self.states.get(transfer_id) is KVPoll.FAILED else None

    def cancel(self, transfer_id: str) -> None:
        self.cancelled.append(transfer_id)
        if self.states.get(transfer_id) not in (KVPoll.WAITING, KVPoll.TRANSFERRING):
            return
        if self.cancel_meets == "its end":
            self.states[transfer_id] = KVPoll.DONE
        elif self.cancel_meets == "a write":
            self.states[transfer_id] = KVPoll.TRANSFERRING
            self._draining[transfer_id] = 2
        else:
            self.states[transfer_id] = KVPoll.FAILED
            self._on_release(transfer_id, self._blocks.pop(transfer_id))

    def close(self) -> None:
        pass


@pytest.fixture()
def worker() -> Any:
    """One per test: the worker's outbox binds the event loop of its first `start`."""
    d = DecodeWorker("d", dict(ENGINE), calibrate=False, metrics_port=None, swap_cpu_bytes=0)
    d.receiver.close()
    d.receiver = ScriptedReceiver(d._on_release)  # type: ignore[assignment]
    yield d
    d.shutdown()


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 60))


def handle(d: DecodeWorker, rid: str) -> bytes:
    block_size = d.core.engine.config.block_size
    num_blocks = cdiv(len(PROMPT), block_size)
    layout = KVLayout(1, 1, 1, 1, block_size, "float32")  # the scripted receiver reads none of it
    return KVHandle(
        rid, "p", ("127.0.0.1:1",), layout, tuple(range(num_blocks)), (), len(PROMPT), d.core.salt
    ).to_bytes()


async def start(d: DecodeWorker, rid: str, first_token: int | None) -> None:
    await d.start(DecodeRequest(rid, PROMPT, first_token, handle(d, rid), GREEDY))
    assert d._arrivals.status(rid) is AWAITING_KV


async def reach(d: DecodeWorker, rid: str, status: ArrivalStatus | None) -> None:
    deadline = time.monotonic() + 10.0
    while d._arrivals.status(rid) is not status:
        assert time.monotonic() < deadline, f"{rid} stayed {d._arrivals.status(rid)}, not {status}"
        await asyncio.sleep(0.005)


async def outputs_until_finished(d: DecodeWorker, rid: str) -> list[StepOutput]:
    got: list[StepOutput] = []
    while not (got and got[-1].finished):
        got += [o for o in await d.next_outputs(5.0) if o.request_id == rid]
    return got


async def all_free(d: DecodeWorker) -> None:
    deadline = time.monotonic() + 10.0
    while True:
        load = await d.load()
        if load.num_free_blocks == load.num_total_blocks:
            break
        free, total = load.num_free_blocks, load.num_total_blocks
        assert time.monotonic() < deadline, f"{free} of {total} blocks free"
        await asyncio.sleep(0.01)
    await d.core.aengine.run(lambda engine: engine.kv_manager.pool.check_integrity())


async def blocks_in_use(d: DecodeWorker) -> int:
    load = await d.load()
    return load.num_total_blocks - load.num_free_blocks


def land(d: DecodeWorker, rid: str) -> None:
    d.receiver.states[rid] = KVPoll.DONE  # type: ignore[attr-defined]


def test_abort_while_awaiting_kv_cancels_the_transfer_and_frees_its_blocks(worker: Any) -> None:
    async def body() -> None:
        await start(worker, "a1", first_token=5)
        assert await blocks_in_use(worker) > 0
        await worker.abort("a1")
        assert worker._arrivals.status("a1") is None and "a1" in worker.receiver.cancelled
        await all_free(worker)

    run(body)


@pytest.mark.parametrize("meets", ["a write", "its end"])
def test_abort_while_awaiting_kv_frees_its_blocks_whatever_the_cancel_meets(
    worker: Any, meets: str
) -> None:
    """A write still landing: the blocks come back on a later poll, which the worker must make
    with nothing else awaiting KV. The transfer just done (the worker has not polled it yet):
    the cancel is a no-op and the blocks, holding its KV, are the worker's to free."""

    async def body() -> None:
        worker.receiver.cancel_meets = meets
        await start(worker, "c1", first_token=None)  # streamed: the first token is still to come
        await worker.abort("c1")
        assert worker._arrivals.status("c1") is None and "c1" in worker.receiver.cancelled
        await all_free(worker)

    run(body)


def test_a_failed_transfer_ends_with_an_error_and_frees_its_blocks(worker: Any) -> None:
    async def body() -> None:
        await start(worker, "f1", first_token=5)
        worker.receiver.states["f1"] = KVPoll.FAILED
        outs = await outputs_until_finished(worker, "f1")
        assert "KV transfer failed: scripted failure" in (outs[-1].error or "")
        assert worker._arrivals.status("f1") is None
        await all_free(worker)

    run(body)


def test_a_streamed_transfer_failed_before_its_first_token_ends_with_the_transfer_error(
    worker: Any,
) -> None:
    """The router's second `start` (with the first token) then finds the request gone: it must
    not fail (the router would answer INTERNAL), since the transfer's error output went out."""

    async def body() -> None:
        await start(worker, "e1", first_token=None)
        worker.receiver.states["e1"] = KVPoll.FAILED
        outs = await outputs_until_finished(worker, "e1")
        assert "KV transfer failed: scripted failure" in (outs[-1].error or "")
        await worker.start(DecodeRequest("e1", PROMPT, 5, handle(worker, "e1"), GREEDY))
        assert worker._arrivals.status("e1") is None and not worker._failed_early
        await worker.abort("e1")  # the router's abort on its way out: a no-op
        await all_free(worker)

    run(body)


def test_landed_kv_waits_for_its_first_token_then_runs_to_its_finish(worker: Any) -> None:
    async def body() -> None:
        await start(worker, "s1", first_token=None)
        land(worker, "s1")
        await reach(worker, "s1", KV_LANDED)
        await worker.start(DecodeRequest("s1", PROMPT, 5, b"", GREEDY))
        assert worker._arrivals.status("s1") in (RUNNING, None)
        outs = await outputs_until_finished(worker, "s1")
        timings = outs[-1].timings
        assert outs[-1].finish_reason == "length" and timings is not None
        # its KV landed before its first token came: no transfer time; the prefill is not ours
        assert timings.kv_transfer == 0.0 and timings.prefill is timings.prefill_queue is None
        assert timings.decode_queue is not None and timings.decode_queue >= 0.0
        assert timings.decode is not None and timings.decode > 0.0
        assert worker._arrivals.status("s1") is None
        await all_free(worker)

    run(body)


def test_abort_of_landed_kv_frees_its_blocks_at_once(worker: Any) -> None:
    async def body() -> None:
        await start(worker, "l1", first_token=None)
        land(worker, "l1")
        await reach(worker, "l1", KV_LANDED)
        await worker.abort("l1")
        assert worker._arrivals.status("l1") is None
        await all_free(worker)

    run(body)


def test_abort_while_running_frees_its_blocks_through_the_engine(worker: Any) -> None:
    async def body() -> None:
        slow = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        await worker.start(DecodeRequest("r1", PROMPT, 5, handle(worker, "r1"), slow))
        land(worker, "r1")
        await reach(worker, "r1", RUNNING)
        await worker.abort("r1")
        await worker.abort("r1")  # idempotent
        assert worker._arrivals.status("r1") is None
        await all_free(worker)

    run(body)


def test_a_second_start_for_an_id_here_is_rejected_holding_nothing_more(worker: Any) -> None:
    async def body() -> None:
        await start(worker, "d1", first_token=5)
        used = await blocks_in_use(worker)
        with pytest.raises(WorkerRejectedError):
            await worker.start(DecodeRequest("d1", PROMPT, 5, handle(worker, "d1"), GREEDY))
        assert await blocks_in_use(worker) == used
        await worker.abort("d1")
        await all_free(worker)

    run(body)
