"""The streamed KV handshake between the real prefill and decode workers, in one process (no
Ray; the gRPC KV transport on CPU): the prefill worker hands out the handle before its result,
the decode worker receives before it knows the first token, and every way out frees the KV."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from decode_worker.arrivals import ArrivalStatus
from decode_worker.worker import DecodeWorker
from engine import LLM, SamplingParams
from prefill_worker.worker import PrefillWorker
from tandem.contract.worker_api import DecodeRequest, PrefillRequest, StepOutput

ENGINE = dict(model="preset:tiny", device="cpu", load_format="dummy")
PROMPT = tuple((11 * i + 5) % 500 for i in range(70))
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 60))


def workers(**decode_kw: Any) -> tuple[PrefillWorker, DecodeWorker]:
    p = PrefillWorker("p", dict(ENGINE), calibrate=False, metrics_port=None)
    d = DecodeWorker(
        "d", dict(ENGINE), calibrate=False, metrics_port=None, swap_cpu_bytes=0, **decode_kw
    )
    return p, d


async def until(cond: Callable[[], Awaitable[bool]], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def outputs_until_finished(d: DecodeWorker, request_id: str) -> list[StepOutput]:
    got: list[StepOutput] = []
    while not (got and got[-1].finished):
        got += [o for o in await d.next_outputs(5.0) if o.request_id == request_id]
    return got


async def all_free(w: PrefillWorker | DecodeWorker) -> bool:
    load = await w.load()
    return load.num_free_blocks == load.num_total_blocks


def test_handle_before_the_first_token_decodes_like_colocated() -> None:
    async def body() -> None:
        p, d = workers()
        try:
            prefill = asyncio.ensure_future(
                p.prefill(PrefillRequest("r", PROMPT, GREEDY, decode_worker_id="d"))
            )
            handle = await p.kv_handle("r")
            assert handle, "a TP = 1 prefill worker streams"
            await d.start(DecodeRequest("r", PROMPT, None, handle, GREEDY))
            result = await prefill
            assert result.kv_handle == handle and not result.finished
            await d.start(
                DecodeRequest(
                    "r", PROMPT, result.first_token_id, b"", GREEDY, first_text=result.text_delta
                )
            )
            outs = await outputs_until_finished(d, "r")
            tokens = [result.first_token_id] + [t for o in outs for t in o.new_token_ids]
            colocated = (
                LLM(**ENGINE, show_progress=False).generate([list(PROMPT)], GREEDY)[0].token_ids
            )
            assert tokens == list(colocated) and outs[-1].error is None
            timings = outs[-1].timings
            assert timings is not None and timings.prefill is timings.prefill_queue is None
            assert timings.kv_transfer is not None and timings.kv_transfer >= 0.0
            assert timings.decode is not None and timings.decode > 0.0
            await until(lambda: _zero(p.kv_leases()))
            await until(lambda: all_free(p))
            await until(lambda: all_free(d))
        finally:
            p.shutdown()
            d.shutdown()

    run(body)


def test_prefill_that_ends_at_its_first_token_frees_its_streamed_lease() -> None:
    async def body() -> None:
        p, _ = workers()
        try:
            one = SamplingParams(temperature=0.0, max_tokens=1)
            prefill = asyncio.ensure_future(p.prefill(PrefillRequest("one", PROMPT, one)))
            assert await p.kv_handle("one")  # streamed all the same: the worker cannot know
            result = await prefill
            assert result.finished and result.kv_handle == b""
            await until(lambda: _zero(p.kv_leases()))
            await until(lambda: all_free(p))
        finally:
            p.shutdown()

    run(body)


def test_kv_handle_of_a_rejected_prefill_answers_empty() -> None:
    async def body() -> None:
        p, _ = workers()
        try:
            waiting = asyncio.ensure_future(p.kv_handle("bad"))
            try:
                await p.prefill(PrefillRequest("bad", (), GREEDY))
            except Exception:  # noqa: BLE001 - an empty prompt is refused
                pass
            assert await asyncio.wait_for(waiting, 5) == b""
        finally:
            p.shutdown()

    run(body)


def test_landed_kv_waiting_for_its_first_token_is_freed_by_abort_and_by_timeout() -> None:
    async def body() -> None:
        p, d = workers(transfer_timeout_s=1.0)
        try:
            for rid in ("aborted", "forgotten"):
                prefill = asyncio.ensure_future(p.prefill(PrefillRequest(rid, PROMPT, GREEDY)))
                await d.start(DecodeRequest(rid, PROMPT, None, await p.kv_handle(rid), GREEDY))
                await prefill
                await until(lambda rid=rid: _landed(d, rid))
            await d.abort("aborted")
            outs = await outputs_until_finished(d, "forgotten")  # no first token within 1 s
            assert "no first token" in (outs[-1].error or "")
            await until(lambda: all_free(d))
            await until(lambda: _zero(p.kv_leases()))
            d.core.engine.kv_manager.pool.check_integrity()
        finally:
            p.shutdown()
            d.shutdown()

    run(body)


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def _landed(d: DecodeWorker, request_id: str) -> bool:
    return d._arrivals.status(request_id) is ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN
