"""`tandem serve` for its operator: what it refuses before Ray starts (a bad `--model`, a busy
port), and the drain on SIGTERM (`RouterServer.drain`, with fake workers and in a real
`tandem serve`): health NOT_SERVING at once, new requests refused UNAVAILABLE "draining",
running streams finish with every token, then exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import grpc
import httpx2 as httpx
import pytest

from engine.demo_model import PRESETS, TINY_RANDOM_NAME
from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer
from tandem.api import generation_pb2 as pb
from tandem.client import AsyncClient, Client, TandemClientError
from tandem.serve import ServeError, ServeOptions, check_model, check_ports, preflight
from tandem.testing.fake_worker import FakeDelays, FakeWorker
from tests.cluster.test_cli import REPO, TANDEM, Served, _free_port

FAST = dict(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.3, poll_wait_s=0.2, poll_grace_s=0.3)
FAIL_FAST_S = 10.0


def _serve_fails(*flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"COLUMNS": "200"}
    start = time.monotonic()
    result = subprocess.run(
        [*TANDEM, "serve", "--device", "cpu", *flags],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, time.monotonic() - start


def _error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_model_that_is_not_there_fails_before_ray() -> None:
    result, took = _serve_fails("--model", "/no/such/checkpoint", "--port", "0")
    assert result.returncode != 0
    assert took < FAIL_FAST_S, took
    [line] = _error_lines(result)
    assert line.startswith("error: --model:") and "/no/such/checkpoint" in line
    assert "Tandem is serving" not in result.stdout


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_a_busy_port_fails_before_ray_naming_its_flag(flag: str, busy_port: int) -> None:
    ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(busy_port)}
    flags = [x for pair in ports.items() for x in pair]
    result, took = _serve_fails("--model", "tiny-random", *flags)
    assert result.returncode != 0
    assert took < FAIL_FAST_S, took
    [line] = _error_lines(result)
    assert line == f"error: {flag}: 127.0.0.1:{busy_port} is in use", line


def test_preflight_knows_the_built_in_names_and_every_port_flag(busy_port: int) -> None:
    check_model(TINY_RANDOM_NAME)
    check_model(f"preset:{next(iter(PRESETS))}")
    with pytest.raises(ServeError, match="no preset 'nope'") as bad:
        check_model("preset:nope")
    assert bad.value.field == "--model"
    check_ports(ServeOptions(port=0, http_port=None, metrics_port=None))
    with pytest.raises(ServeError) as twice:
        check_ports(ServeOptions(port=busy_port + 1, http_port=busy_port + 1))
    assert twice.value.field == "--http-port"
    with pytest.raises(ServeError) as busy:
        preflight(ServeOptions(model=TINY_RANDOM_NAME, port=0, http_port=0, metrics_port=busy_port))
    assert busy.value.field == "--metrics-port"


# -- RouterServer.drain with fake workers ---------------------------------------------------


def test_drain_refuses_new_requests_and_lets_running_ones_finish() -> None:
    async def body() -> None:
        config = RouterConfig(max_model_len=512, http_port=0, **FAST)  # type: ignore[arg-type]
        server = RouterServer(config, ByteTokenizer())
        await server.start()
        workers = {
            "p0": ("prefill", FakeWorker("p0")),
            "d0": ("decode", FakeWorker("d0", delays=FakeDelays(step_s=0.01))),
        }
        for wid, (pool, worker) in workers.items():
            await server.add_worker(wid, pool, worker)
        client = AsyncClient(server.address)
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}")
        try:
            await _drain_while_streaming(server, client, http)
        finally:
            await http.aclose()
            await client.close()
            await server.stop(grace_s=0.1)
            for _, worker in workers.values():
                await worker.close()

    asyncio.run(asyncio.wait_for(body(), 30))


async def _drain_while_streaming(
    server: RouterServer, client: AsyncClient, http: httpx.AsyncClient
) -> None:
    deadline = time.monotonic() + 5
    while await client.health() != "SERVING":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (await http.get("/health")).status_code == 200
    stream = client.generate("hello", max_tokens=50, ignore_eos=True)
    first = await anext(stream)
    draining = asyncio.ensure_future(server.drain(10.0))
    await asyncio.sleep(0)  # the drain has flipped health and the refusal
    assert await client.health() == "NOT_SERVING"
    health = await http.get("/health")
    assert health.status_code == 503 and "draining" in health.text
    with pytest.raises(TandemClientError) as refused:
        await client.generate_text("again", max_tokens=2)
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "draining" in refused.value.details
    body = {"model": server.config.model_name, "prompt": "again", "max_tokens": 2}
    completion = await http.post("/v1/completions", json=body)
    assert completion.status_code == 503 and "draining" in completion.text
    rest = [m async for m in stream]
    assert sum(len(m.token_ids) for m in [first, *rest]) == 50
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert await asyncio.wait_for(draining, 5) is True
    assert server.orchestrator.num_active == 0


def test_drain_times_out_while_a_request_runs() -> None:
    async def body() -> None:
        server = RouterServer(RouterConfig(max_model_len=512, **FAST), ByteTokenizer())  # type: ignore[arg-type]
        await server.start()
        slow = FakeWorker("c0", delays=FakeDelays(step_s=0.05))
        await server.add_worker("c0", "colocated", slow)
        client = AsyncClient(server.address)
        try:
            stream = client.generate("hello", max_tokens=200, ignore_eos=True, request_id="r")
            await anext(stream)
            assert await server.drain(0.2) is False
            assert server.orchestrator.num_active == 1
            # End it before stopping: RouterServer.stop with a stream still running sometimes
            # waits out the call's deadline (known, not the drain's doing).
            assert server.orchestrator.abort("r")
            rest = [m async for m in stream]
            assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
        finally:
            await client.close()
            await server.stop(grace_s=0.1)
            await slow.close()

    asyncio.run(asyncio.wait_for(body(), 30))


# -- a real `tandem serve` ------------------------------------------------------------------


def test_sigterm_drains_a_running_stream_then_exits_0() -> None:
    port = _free_port()
    server = Served(port, "--device", "cpu", "--model", "tiny-random", "--metrics-port", "0")
    try:
        server.wait_for("Press Ctrl-C to stop.", 180)
        out = "".join(server.output)
        for text in ("model path:", "max context: ", "KV cache", "decode-0: ", "router: 127.0.0."):
            assert text in out, out
        [line] = [x for x in server.output if "OpenAI API:" in x]
        base_url = line.split("OpenAI API:", 1)[1].strip().removesuffix("/v1")
        _drain_a_real_stream(server, f"127.0.0.1:{port}", base_url)
        assert server.proc.wait(timeout=60) == 0, "".join(server.output)
        out = "".join(server.output)
        assert "Drained: every request finished." in out and "Stopped." in out, out
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)


def _drain_a_real_stream(server: Served, address: str, base_url: str) -> None:
    max_tokens = 600  # ~6 s on a CPU: time enough to probe the draining router
    with Client(address, timeout=30) as client:
        stream = client.generate("Hello", max_tokens=max_tokens, ignore_eos=True)
        msgs = [next(stream)]
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
            time.sleep(0.02)
        assert httpx.get(f"{base_url}/health").status_code == 503
        with pytest.raises(TandemClientError) as refused:
            client.generate_text("again", max_tokens=2)
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert "draining" in refused.value.details
        msgs += list(stream)
    assert sum(len(m.token_ids) for m in msgs) == max_tokens
    assert (
        msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
        and msgs[-1].completion_tokens == max_tokens
    )
