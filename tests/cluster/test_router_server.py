"""The real gRPC router on 127.0.0.1 (free port) in front of in-process fake workers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer
from tandem.api import generation_pb2 as pb
from tandem.client import AsyncClient, Slo, TandemClientError
from tandem.contract.worker_api import CostModel
from tandem.testing.fake_worker import FailMode, FakeDelays, FakeWorker

MAX_MODEL_LEN = 512
FAST = dict(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.3, poll_wait_s=0.2, poll_grace_s=0.3)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def cluster(
    workers: dict[str, tuple[str, FakeWorker]], **config: Any
) -> AsyncIterator[tuple[RouterServer, AsyncClient]]:
    server = RouterServer(
        RouterConfig(max_model_len=MAX_MODEL_LEN, **{**FAST, **config}), ByteTokenizer()
    )
    await server.start()
    for wid, (pool, worker) in workers.items():
        await server.add_worker(wid, pool, worker)
    client = AsyncClient(server.address, max_message_bytes=64 * 1024 * 1024)
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(grace_s=0.1)
        for _, worker in workers.values():
            await worker.close()


def pd(step_s: float = 0.0, **kw: Any) -> dict[str, tuple[str, FakeWorker]]:
    return {
        "p0": ("prefill", FakeWorker("p0", **kw)),
        "d0": ("decode", FakeWorker("d0", delays=FakeDelays(step_s=step_s), **kw)),
    }


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def ids(calls: Any) -> list[str]:
    """The callers' request ids of a fake worker's calls (workers see `router.attempt.attempt_id`)."""
    return [call.rsplit("#", 1)[0] for call in calls]


async def collect(client: AsyncClient, prompt: Any, **kw: Any) -> list[pb.GenerateResponse]:
    return [m async for m in client.generate(prompt, **kw)]


# -- streaming ------------------------------------------------------------------------------


def test_stream_echoes_tokens_with_final_counts_and_timings() -> None:
    async def body() -> None:
        workers = pd()
        async with cluster(workers) as (_, client):
            msgs = await collect(client, "hello", max_tokens=12, request_id="r-1")
        assert msgs[0].token_ids == [ord("h")] and not msgs[0].HasField("finish_reason")
        tokens = [t for m in msgs for t in m.token_ids]
        assert bytes(tokens).decode() == "hellohellohe"
        assert "".join(m.text_delta for m in msgs) == "hellohellohe"
        final = msgs[-1]
        assert final.request_id == "r-1" and final.finish_reason == pb.FINISH_REASON_LENGTH
        assert final.prompt_tokens == 5 and final.completion_tokens == 12
        t = final.timings
        for name in (
            "router_queue",
            "prefill_queue",
            "prefill",
            "kv_transfer",
            "decode_queue",
            "decode",
        ):
            assert t.HasField(name), name
        assert 0 < t.time_to_first_token <= t.end_to_end
        assert ids(workers["p0"][1].prefills) == ["r-1"] and ids(workers["d0"][1].starts) == ["r-1"]
        assert workers["p0"][1].leases == {} and workers["d0"][1].num_free_blocks == 4096

    run(body())


def test_token_ids_and_chat_prompts_and_stop_token() -> None:
    async def body() -> None:
        async with cluster(pd()) as (_, client):
            text, final = await client.generate_text(
                [65, 66, 67, 68], max_tokens=50, stop_token_ids=[67]
            )
            assert text == "ABC" and final.finish_reason == pb.FINISH_REASON_STOP
            text, final = await client.generate_text(
                [{"role": "user", "content": "hi"}], max_tokens=3
            )
            assert text == "use" and final.prompt_tokens == len("user: hi\nassistant: ")

    run(body())


def test_one_token_request_ends_at_prefill() -> None:
    async def body() -> None:
        workers = pd()
        async with cluster(workers) as (_, client):
            msgs = await collect(client, "xyz", max_tokens=1)
        assert len(msgs) == 1 and msgs[0].token_ids == [ord("x")]
        assert msgs[0].finish_reason == pb.FINISH_REASON_LENGTH and msgs[0].completion_tokens == 1
        assert workers["d0"][1].starts == []

    run(body())


def streaming_pd(prefill_s: float = 0.2, step_s: float = 0.0) -> dict[str, tuple[str, FakeWorker]]:
    return {
        "p0": (
            "prefill",
            FakeWorker("p0", delays=FakeDelays(prefill_s=prefill_s), streams_kv=True),
        ),
        "d0": ("decode", FakeWorker("d0", delays=FakeDelays(step_s=step_s))),
    }


def test_streamed_kv_starts_the_decode_worker_before_the_first_token() -> None:
    async def body() -> None:
        workers = streaming_pd()
        p, d = workers["p0"][1], workers["d0"][1]
        async with cluster(workers) as (_, client):
            request = asyncio.ensure_future(
                collect(client, "hello", max_tokens=12, request_id="s-1")
            )
            await until(lambda: ids(d.starts) == ["s-1"])
            assert "s-1" in ids(p._prefilling), "the decode worker started while the prefill ran"
            msgs = await request
        assert bytes(t for m in msgs for t in m.token_ids).decode() == "hellohellohe"
        assert (
            ids(d.starts) == ["s-1", "s-1"] and len(set(d.starts)) == 1
        )  # the KV handle, then the first token
        assert p.leases == {} and d.num_free_blocks == d.num_total_blocks

    run(body())


def test_streamed_kv_off_in_the_config_starts_decode_once() -> None:
    async def body() -> None:
        workers = streaming_pd(prefill_s=0.02)
        async with cluster(workers, stream_kv=False) as (_, client):
            text, _ = await client.generate_text("hello", max_tokens=7)
        assert text == "helloh" + "e" and workers["d0"][1].starts == [workers["p0"][1].prefills[0]]

    run(body())


def test_streamed_request_that_ends_at_its_first_token_is_aborted_on_the_decode_worker() -> None:
    async def body() -> None:
        workers = streaming_pd()
        p, d = workers["p0"][1], workers["d0"][1]
        async with cluster(workers) as (_, client):
            text, final = await client.generate_text(
                "xyz", max_tokens=20, stop_token_ids=[ord("x")], request_id="s-2"
            )
            assert text == "x" and final.finish_reason == pb.FINISH_REASON_STOP
            await until(lambda: "s-2" in ids(d.aborts))
        assert (
            ids(d.starts) == ["s-2"] and p.leases == {} and d.num_free_blocks == d.num_total_blocks
        )

    run(body())


def test_cancel_while_the_streamed_prefill_runs_aborts_both_workers() -> None:
    async def body() -> None:
        workers = streaming_pd(prefill_s=0.5)
        p, d = workers["p0"][1], workers["d0"][1]
        async with cluster(workers) as (_, client):
            request = asyncio.ensure_future(collect(client, "abc", max_tokens=50, request_id="s-3"))
            await until(lambda: ids(d.starts) == ["s-3"])
            request.cancel()
            await until(lambda: "s-3" in ids(p.aborts) and "s-3" in ids(d.aborts))
            await until(lambda: d.num_running == 0)
        assert p.leases == {} and d.num_free_blocks == d.num_total_blocks

    run(body())


def test_64_concurrent_streams_complete() -> None:
    async def body() -> None:
        async with cluster(pd(step_s=0.001)) as (_, client):
            results = await asyncio.gather(
                *(client.generate_text(f"req{i:02d}", max_tokens=16) for i in range(64))
            )
        for i, (text, final) in enumerate(results):
            assert text == (f"req{i:02d}" * 4)[:16] and final.completion_tokens == 16

    run(body())


def test_colocated_worker_serves_alone() -> None:
    async def body() -> None:
        worker = FakeWorker("c0", delays=FakeDelays(tokens_per_step=3))
        async with cluster({"c0": ("colocated", worker)}) as (_, client):
            assert await client.health() == "SERVING"
            text, final = await client.generate_text("abcd", max_tokens=10)
        assert text == "abcdabcdab" and final.completion_tokens == 10
        assert (
            final.finish_reason == pb.FINISH_REASON_LENGTH
            and worker.submits
            and not worker.prefills
        )

    run(body())


# -- bad input ------------------------------------------------------------------------------

BAD_INPUTS: list[tuple[str, dict[str, Any], str]] = [
    ("", {}, "text"),
    ([], {}, "token_ids"),
    ("hi", {"max_tokens": MAX_MODEL_LEN}, "sampling.max_tokens"),
    ("x" * MAX_MODEL_LEN, {}, "prompt"),
    ("hi", {"temperature": -0.5}, "sampling.temperature"),
    ("hi", {"top_p": 1.5}, "sampling.top_p"),
    ("hi", {"n": 1_000_000}, "sampling.n"),
    ("hi", {"logprobs": 1_000_000}, "sampling.logprobs"),
    ([1, 2, 100_000], {}, "token_ids"),
    ([1, -5], {}, "token_ids"),
    ("hi", {"stop": ["s" * (1 << 20)]}, "sampling.stop"),
    ("hi", {"stop": ["a"] * 100}, "sampling.stop"),
    ("hi", {"stop_token_ids": [100_000]}, "sampling.stop_token_ids"),
    ("hi", {"seed": 2**64 - 1}, "sampling.seed"),
    ("hi", {"request_id": "bad id with spaces"}, "request_id"),
    ("hi", {"slo": "platinum"}, "slo_class"),
    ("hi", {"slo": Slo(ttft_ms=-1.0)}, "ttft_ms"),
    ("hi", {"priority": 10**6}, "priority"),
    ([{"role": "", "content": "x"}], {}, "chat"),
]


@pytest.mark.parametrize(
    ("prompt", "kwargs", "field"), BAD_INPUTS, ids=[c[2] + str(i) for i, c in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_invalid_argument_naming_the_field(
    prompt: Any, kwargs: dict[str, Any], field: str
) -> None:
    async def body() -> None:
        workers = pd()
        async with cluster(workers) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, prompt, **kwargs)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details.startswith(f"{field}:"), info.value.details
        for _, worker in workers.values():
            assert not (worker.prefills or worker.starts or worker.submits), (
                "a bad request reached a worker"
            )

    run(body())


def test_missing_prompt_is_invalid_argument() -> None:
    async def body() -> None:
        async with cluster(pd()) as (server, _):
            async with grpc.aio.insecure_channel(server.address) as channel:
                from tandem.api import generation_pb2_grpc

                call = generation_pb2_grpc.GenerationStub(channel).Generate(pb.GenerateRequest())
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
        assert (
            info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            and info.value.details().startswith("prompt:")
        )

    run(body())


def test_oversized_message_is_resource_exhausted() -> None:
    async def body() -> None:
        workers = pd()
        async with cluster(workers, max_message_bytes=64 * 1024) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, "x" * (128 * 1024))
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await client.generate_text("ok", max_tokens=2))[
                0
            ] == "ok"  # the server lives on
        assert workers["p0"][1].prefills != [] and len(workers["p0"][1].prefills) == 1

    run(body())


# -- admission ------------------------------------------------------------------------------


def test_infeasible_slo_is_rejected_before_any_prefill_and_best_effort_is_served() -> None:
    async def body() -> None:
        slow = CostModel(prefill_s_per_token=0.1)  # 5 prompt tokens -> 0.5 s predicted TTFT
        workers = {
            "p0": ("prefill", FakeWorker("p0", cost=slow)),
            "d0": ("decode", FakeWorker("d0")),
        }
        async with cluster(workers) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, "hello", max_tokens=4, slo=Slo(ttft_ms=50))
            assert (
                info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "TTFT" in info.value.details
            )
            assert workers["p0"][1].prefills == []
            text, _ = await client.generate_text(
                "hello", max_tokens=4, slo=Slo(ttft_ms=50), best_effort=True
            )
            assert text == "hell" and len(workers["p0"][1].prefills) == 1

    run(body())


def test_no_kv_room_is_resource_exhausted() -> None:
    async def body() -> None:
        workers = {
            "p0": ("prefill", FakeWorker("p0")),
            "d0": ("decode", FakeWorker("d0", num_blocks=2)),
        }
        async with cluster(workers) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, "hello", max_tokens=100)
        assert (
            info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and workers["p0"][1].prefills == []
        )

    run(body())


# -- cancel, deadline, abort ----------------------------------------------------------------


def test_client_cancel_mid_stream_aborts_on_both_workers() -> None:
    async def body() -> None:
        workers = pd(step_s=0.01)
        p, d = workers["p0"][1], workers["d0"][1]
        async with cluster(workers) as (_, client):
            stream = client.generate("abc", max_tokens=400, request_id="cancel-me")
            for _ in range(3):
                await stream.__anext__()
            await stream.aclose()  # cancels the RPC
            await until(lambda: "cancel-me" in ids(p.aborts) and "cancel-me" in ids(d.aborts))
            await until(lambda: d.num_running == 0)
        assert p.leases == {} and d.num_free_blocks == d.num_total_blocks

    run(body())


def test_deadline_is_deadline_exceeded_and_aborts() -> None:
    async def body() -> None:
        workers = pd(step_s=0.01)
        async with cluster(workers) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, "abc", max_tokens=400, request_id="slow", timeout=0.3)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(
                lambda: (
                    "slow" in ids(workers["p0"][1].aborts)
                    and "slow" in ids(workers["d0"][1].aborts)
                )
            )

    run(body())


def test_abort_rpc_ends_the_stream_with_abort() -> None:
    async def body() -> None:
        workers = pd(step_s=0.01)
        async with cluster(workers) as (_, client):
            stream = client.generate("abc", max_tokens=400, request_id="victim")
            await stream.__anext__()
            assert await client.abort("victim") and not await client.abort("nobody")
            msgs = [m async for m in stream]
            assert msgs[-1].finish_reason == pb.FINISH_REASON_ABORT
            await until(lambda: "victim" in ids(workers["d0"][1].aborts))

    run(body())


# -- failures and health --------------------------------------------------------------------


@pytest.mark.parametrize("mode", [FailMode.RAISE, FailMode.HANG])
def test_decode_worker_death_is_unavailable_fast_and_others_take_over(mode: FailMode) -> None:
    async def body() -> None:
        workers = pd(step_s=0.01)
        workers["d1"] = ("decode", FakeWorker("d1", delays=FakeDelays(step_s=0.01)))
        async with cluster(workers) as (server, client):
            stream = client.generate("abc", max_tokens=400, request_id="doomed")
            await stream.__anext__()
            await stream.__anext__()
            victim = next(w for _, w in workers.values() if "doomed" in ids(w.starts))
            victim.fail(mode)
            start = time.monotonic()
            with pytest.raises(TandemClientError) as info:
                async for _ in stream:
                    pass
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - start < 5.0
            await until(lambda: not server.registry.get(victim.worker_id).healthy)
            for i in range(4):
                text, _ = await client.generate_text("after", max_tokens=3, request_id=f"later-{i}")
                assert text == "aft"
            assert not any(s.startswith("later") for s in victim.starts)

    run(body())


def test_prefill_worker_death_is_unavailable() -> None:
    async def body() -> None:
        workers = pd()
        workers["p0"][1].fail(FailMode.RAISE)
        async with cluster(workers) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, "abc", max_tokens=4)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE

    run(body())


def test_health_follows_the_pools() -> None:
    async def body() -> None:
        p, d = FakeWorker("p0"), FakeWorker("d0")
        async with cluster({}) as (server, client):
            assert await client.health() == "NOT_SERVING"
            await server.add_worker("p0", "prefill", p)
            assert await client.health() == "NOT_SERVING"
            await server.add_worker("d0", "decode", d)
            await until_health(client, "SERVING")
            assert await client.health("tandem.v1.Generation") == "SERVING"
            d.fail(FailMode.RAISE)
            await until_health(client, "NOT_SERVING")
            d.fail(FailMode.NONE)
            await until_health(client, "SERVING")
            status = await client.cluster_status()
            assert {(w.worker_id, w.pool, w.healthy) for w in status.workers} == {
                ("p0", "prefill", True),
                ("d0", "decode", True),
            }
            info = await client.model_info()
            assert (
                info.max_model_len == MAX_MODEL_LEN
                and info.vocab_size == 257
                and "interactive" in info.slo_classes
            )
        await p.close()
        await d.close()

    run(body())


async def until_health(client: AsyncClient, status: str) -> None:
    deadline = time.monotonic() + 3.0
    while (current := await client.health()) != status:
        assert time.monotonic() < deadline, f"health stayed {current}, wanted {status}"
        await asyncio.sleep(0.02)
