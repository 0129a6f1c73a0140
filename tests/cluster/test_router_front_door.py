"""The router's front door on the wire (the real gRPC server, fake workers): bytes that do not
parse, deadlines in the failure metric, and one log line per request that fails."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import pytest

from router.server import DEADLINE_SLACK_S, expired
from tandem.api import generation_pb2 as pb
from tandem.api import generation_pb2_grpc as pb_grpc
from tandem.client import TandemClientError
from tandem.contract.worker_api import PrefillRequest, PrefillResult
from tandem.testing.fake_worker import FailMode, FakeWorker
from tests.cluster.test_router_server import cluster, collect, pd, run

GENERATE = "/tandem.v1.Generation/Generate"


def failed(server: Any, code: str) -> float:
    value = server.metrics.registry.get_sample_value(
        "tandem_requests_failed_total", {"model": server.config.model_name, "code": code}
    )
    return 0.0 if value is None else value


# -- bytes that do not parse ----------------------------------------------------------------


def utf8_broken(field: str) -> bytes:
    """A GenerateRequest whose `field` (a string) holds bytes that are not UTF-8."""
    msg = pb.GenerateRequest(text="@@", request_id="r-1")
    if field == "chat.messages.content":
        msg = pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user")]))
        msg.chat.messages[0].content = "@@"
    return msg.SerializeToString().replace(b"@@" if field != "request_id" else b"r-1", b"\xc3(")


@pytest.mark.parametrize("field", ["text", "request_id", "chat.messages.content"])
def test_a_string_that_is_not_utf8_is_invalid_argument_naming_it(
    field: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        workers = pd()
        async with cluster(workers) as (server, _):
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = channel.unary_stream(GENERATE)(utf8_broken(field))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [m async for m in call]
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == f"{field}: not valid UTF-8"
            rejected = server.metrics.registry.get_sample_value(
                "tandem_requests_rejected_total",
                {"model": server.config.model_name, "reason": "invalid_argument"},
            )
            assert rejected == 1.0
        assert workers["p0"][1].prefills == []

    with caplog.at_level(logging.WARNING, logger="router.server"):
        run(body())
    assert any(f"{field}: not valid UTF-8" in r.getMessage() for r in caplog.records)


def test_bytes_that_are_not_a_message_are_invalid_argument_and_other_calls_too() -> None:
    async def body() -> None:
        async with cluster(pd()) as (server, _):
            async with grpc.aio.insecure_channel(server.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [m async for m in channel.unary_stream(GENERATE)(b"\x0a\xff\xff")]
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid tandem.v1.GenerateRequest" in info.value.details()
                abort = channel.unary_unary("/tandem.v1.Generation/Abort")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await abort(b"\x0a\x02\xff\xfe")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "request_id: not valid UTF-8"
                stub = pb_grpc.GenerationStub(channel)  # well-formed calls still work
                found = await stub.Abort(pb.AbortRequest(request_id="nobody"))
                assert not found.found

    run(body())


# -- deadlines ------------------------------------------------------------------------------


def test_a_cancel_close_to_the_deadline_is_the_deadline() -> None:
    assert expired(100.0, now=100.0) and expired(100.0, now=100.0 - DEADLINE_SLACK_S)
    assert not expired(100.0, now=99.0 - DEADLINE_SLACK_S) and not expired(None, now=1e12)


def test_expired_deadlines_count_as_deadline_exceeded() -> None:
    """Plain short deadlines, and calls cancelled just before their deadline: what a client's
    own expired deadline looks like where its cancel reaches the server before the server's
    copy of the deadline passes. A cancel well before the deadline stays CANCELLED."""

    async def body() -> None:
        async with cluster(pd(step_s=0.01)) as (server, _):
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.GenerationStub(channel)

                async def call(timeout: float, cancel_after: float | None) -> grpc.StatusCode:
                    sampling = pb.SamplingParams(max_tokens=400, ignore_eos=True)
                    request = pb.GenerateRequest(text="abc", sampling=sampling)
                    stream = stub.Generate(request, timeout=timeout)
                    if cancel_after is not None:
                        asyncio.get_running_loop().call_later(cancel_after, stream.cancel)
                    try:
                        async for _ in stream:
                            pass
                    except grpc.aio.AioRpcError as exc:
                        return exc.code()
                    except asyncio.CancelledError:
                        return grpc.StatusCode.CANCELLED
                    return grpc.StatusCode.OK

                plain = [call(0.2 + 0.05 * i, None) for i in range(6)]
                early = [call(0.6 + 0.05 * i, 0.55 + 0.05 * i) for i in range(4)]
                codes = await asyncio.gather(*plain, *early, call(30.0, 0.3))
            assert set(codes[:6]) == {grpc.StatusCode.DEADLINE_EXCEEDED}
            await asyncio.sleep(0.2)  # the handlers hear of the last cancels
            assert failed(server, "DEADLINE_EXCEEDED") == 10
            assert failed(server, "CANCELLED") == 1

    run(body())


# -- one log line per failed request --------------------------------------------------------


class BrokenPrefill(FakeWorker):
    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        raise RuntimeError("a bug in the worker")


def lines(caplog: pytest.LogCaptureFixture, request_id: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "router.server" and f"request {request_id} " in r.getMessage()
    ]


def test_failures_log_one_line_with_request_id_stage_and_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        workers = pd(step_s=0.01)
        async with cluster(workers) as (_, client):
            await collect(client, "fine", max_tokens=3, request_id="fine")
            with pytest.raises(TandemClientError) as info:
                await collect(client, "abc", max_tokens=400, request_id="late", timeout=0.3)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            stream = client.generate("abc", max_tokens=400, request_id="orphan")
            await stream.__anext__()
            workers["d0"][1].fail(FailMode.RAISE)
            with pytest.raises(TandemClientError) as info:
                [m async for m in stream]
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        broken = {"p0": ("prefill", BrokenPrefill("p0")), "d0": pd()["d0"]}
        async with cluster(broken) as (_, client):
            with pytest.raises(TandemClientError) as info:
                await collect(client, "abc", max_tokens=4, request_id="buggy")
            assert info.value.code == grpc.StatusCode.INTERNAL

    with caplog.at_level(logging.INFO, logger="router.server"):
        run(body())
    (late,) = lines(caplog, "late")
    assert "stage decode: DEADLINE_EXCEEDED: the call's deadline passed" in late
    assert "late#" in late  # the id its workers know it by
    (orphan,) = lines(caplog, "orphan")
    assert "stage decode: UNAVAILABLE:" in orphan
    (buggy,) = lines(caplog, "buggy")
    assert "stage prefill: INTERNAL: worker p0 failed: RuntimeError('a bug in the worker')" in buggy
    assert lines(caplog, "fine") == []
