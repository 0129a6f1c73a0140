"""API keys on the real gRPC router (fake workers behind it): every method it serves, found from
what the server registers and the services' descriptors (never a hand-written list), is refused
UNAUTHENTICATED without the key or with a wrong one, health excepted; the right key gets in.
Every route of the HTTP app likewise answers 401 without the key, /health and /metrics excepted.
Also `tandem.client` and the CLI with a key, and the spec / `tandem serve` plumbing."""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
import yaml
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from typer.testing import CliRunner

from router.auth import INVALID_KEY, MISSING_KEY
from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer
from tandem.api import generation_pb2 as pb
from tandem.cli import app
from tandem.client import AsyncClient, Client, TandemClientError
from tandem.cluster import ClusterConfig, LocalCluster
from tandem.launch_config import LaunchError, router_config, spec_api_key
from tandem.placement import NodeInfo, plan_cluster
from tandem.spec import parse_spec
from tandem.testing.fake_worker import FakeWorker

KEY = "tk-test-0123456789abcdef"
WRONG = "tk-test-0123456789abcdeX"
KEYLESS_SERVICES = {health_pb2.DESCRIPTOR.services_by_name["Health"].full_name}
FAST = dict(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.3, poll_wait_s=0.2, poll_grace_s=0.3)
REPO = Path(__file__).resolve().parents[2]
Metadata = Sequence[tuple[str, str]]


class Method(NamedTuple):
    path: str  # "/package.Service/Method"
    client_streaming: bool
    server_streaming: bool

    @property
    def service(self) -> str:
        return self.path.split("/")[1]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


class Registrations:
    """What RouterServer registers on its grpc.aio server (recorded, then passed on unchanged)."""

    def __init__(self) -> None:
        self.services: set[str] = set()
        self.methods: set[Method] = set()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cls = grpc.aio._server.Server  # the class grpc.aio.server() returns
        add_generic, add_registered = (
            cls.add_generic_rpc_handlers,
            cls.add_registered_method_handlers,
        )

        def generic(server: Any, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
            for handler in handlers:
                assert isinstance(handler, grpc.ServiceRpcHandler), handler  # names its service
                self.services.add(handler.service_name())
            add_generic(server, handlers)

        def registered(server: Any, service: str, handlers: dict[str, Any]) -> None:
            self.services.add(service)
            for name, h in handlers.items():
                path = f"/{service}/{name}"
                self.methods.add(Method(path, h.request_streaming, h.response_streaming))
            add_registered(server, service, handlers)

        monkeypatch.setattr(cls, "add_generic_rpc_handlers", generic)
        monkeypatch.setattr(cls, "add_registered_method_handlers", registered)


def every_method(registered: Registrations) -> set[Method]:
    """Every method of every service the server registered, from its descriptor, plus every
    method of the Generation proto (so a new RPC is covered even before it is registered)."""
    pool = descriptor_pool.Default()
    services = {pool.FindServiceByName(name) for name in registered.services}
    services |= set(pb.DESCRIPTOR.services_by_name.values())
    methods = {
        Method(f"/{s.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for s in services
        for m in s.methods
    }
    missing = registered.methods - methods
    assert not missing, f"registered methods without a descriptor: {missing}"
    return methods


@asynccontextmanager
async def keyed_router(**config: Any) -> AsyncIterator[tuple[RouterServer, list[FakeWorker]]]:
    settings: dict[str, Any] = {**FAST, "api_key": KEY, **config}
    server = RouterServer(RouterConfig(max_model_len=256, **settings), ByteTokenizer())
    await server.start()
    workers = [FakeWorker("p0"), FakeWorker("d0")]
    await server.add_worker("p0", "prefill", workers[0])
    await server.add_worker("d0", "decode", workers[1])
    try:
        yield server, workers
    finally:
        await server.stop(grace_s=0.1)
        for w in workers:
            await w.close()


async def call(
    channel: grpc.aio.Channel, method: Method, metadata: Metadata, request: bytes = b""
) -> tuple[grpc.StatusCode, str]:
    """One call with raw bytes (b"": the empty message of any type); the status it ends with, or
    OK once a streamed response arrived (a stream such as health Watch never ends by itself)."""
    shape = (method.client_streaming, method.server_streaming)
    make = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[shape]
    rpc: Any = make(method.path)  # no serializers: bytes in, bytes out
    arg: Any = iter([request]) if method.client_streaming else request
    try:
        if not method.server_streaming:
            await rpc(arg, metadata=metadata, timeout=10)
            return grpc.StatusCode.OK, ""
        stream = rpc(arg, metadata=metadata, timeout=10)
        async for _ in stream:
            break
        stream.cancel()
        return grpc.StatusCode.OK, ""
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


MISSING: list[Metadata] = [(), (("x-api-key", KEY),)]
WRONG_KEYS: list[Metadata] = [
    (("authorization", f"Bearer {WRONG}"),),
    (("authorization", KEY),),
    (("authorization", f"Basic {KEY}"),),
    (("authorization", f"Bearer  {KEY}"),),
    (("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {WRONG}")),
]
RIGHT_KEYS: list[Metadata] = [
    (("authorization", f"Bearer {KEY}"),),
    (("authorization", f"bearer {KEY}"),),
]


def test_every_method_needs_the_key_except_health(monkeypatch: pytest.MonkeyPatch) -> None:
    registered = Registrations()
    registered.install(monkeypatch)

    async def body() -> None:
        async with keyed_router(enable_reflection=True) as (server, _):
            methods = every_method(registered)
            services = {m.service for m in methods}
            assert "tandem.v1.Generation" in services and KEYLESS_SERVICES <= services
            assert any("reflection" in s for s in services)  # enable_reflection registered it
            async with grpc.aio.insecure_channel(server.address) as channel:
                for method in sorted(methods):
                    await check_method(channel, method)

    run(body())


async def check_method(channel: grpc.aio.Channel, method: Method) -> None:
    keyless = method.service in KEYLESS_SERVICES
    for metadata in MISSING:
        code, details = await call(channel, method, metadata)
        if keyless:
            assert code != grpc.StatusCode.UNAUTHENTICATED, (method, details)
        else:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code, details)
            assert details.startswith(MISSING_KEY), (method, details)
    for metadata in WRONG_KEYS:
        code, details = await call(channel, method, metadata)
        if not keyless:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (method, metadata, code)
            assert details.startswith(INVALID_KEY) and KEY not in details, (method, details)
    for metadata in RIGHT_KEYS:
        code, details = await call(channel, method, metadata)
        assert code != grpc.StatusCode.UNAUTHENTICATED, (method, metadata, details)


def test_unknown_methods_are_unauthenticated_without_the_key() -> None:
    async def body() -> None:
        async with keyed_router() as (server, _):
            nope = Method("/tandem.v1.Generation/NoSuchMethod", False, False)
            async with grpc.aio.insecure_channel(server.address) as channel:
                code, _ = await call(channel, nope, ())
                assert code == grpc.StatusCode.UNAUTHENTICATED  # nothing learnt of the API
                code, _ = await call(channel, nope, RIGHT_KEYS[0])
                assert code == grpc.StatusCode.UNIMPLEMENTED

    run(body())


def test_a_refused_generate_reaches_no_worker_and_parses_nothing() -> None:
    async def body() -> None:
        async with keyed_router() as (server, workers):
            generate = Method("/tandem.v1.Generation/Generate", False, True)
            valid = pb.GenerateRequest(text="hello").SerializeToString()
            async with grpc.aio.insecure_channel(server.address) as channel:
                code, _ = await call(channel, generate, (), valid)
                assert code == grpc.StatusCode.UNAUTHENTICATED
                garbage = b"\xff\xff\xff"  # would be INVALID_ARGUMENT once parsed
                code, _ = await call(channel, generate, WRONG_KEYS[0], garbage)
                assert code == grpc.StatusCode.UNAUTHENTICATED
            assert workers[0].prefills == [] and workers[1].starts == []

    run(body())


def test_async_client_with_the_key_serves_and_without_it_only_health() -> None:
    async def body() -> None:
        async with keyed_router() as (server, _):
            async with AsyncClient(server.address, api_key=KEY, timeout=10) as client:
                text, final = await client.generate_text("hello", max_tokens=4)
                assert text == "hell" and final.completion_tokens == 4
                assert (await client.model_info()).max_model_len == 256
                assert len((await client.cluster_status()).workers) == 2
                assert await client.abort("nobody") is False
            async with AsyncClient(server.address, timeout=10) as keyless:
                assert await keyless.health() in ("SERVING", "NOT_SERVING")
                with pytest.raises(TandemClientError) as err:
                    await keyless.generate_text("hello", max_tokens=4)
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            async with AsyncClient(server.address, api_key=WRONG, timeout=10) as wrong:
                with pytest.raises(TandemClientError) as err:
                    await wrong.model_info()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
                assert err.value.details.startswith(INVALID_KEY)

    run(body())


def test_blocking_client_sends_the_key() -> None:
    def use(address: str, api_key: str | None) -> str:
        with Client(address, api_key=api_key, timeout=10) as client:
            try:
                return client.generate_text("hello", max_tokens=4)[0]
            except TandemClientError as exc:
                return exc.code.name

    async def body() -> None:
        async with keyed_router() as (server, _):
            assert await asyncio.to_thread(use, server.address, KEY) == "hell"
            assert await asyncio.to_thread(use, server.address, None) == "UNAUTHENTICATED"

    run(body())


def test_a_keyless_router_ignores_a_client_key() -> None:
    async def body() -> None:
        async with keyed_router(api_key=None) as (server, _):
            async with AsyncClient(server.address, api_key=KEY, timeout=10) as client:
                assert (await client.generate_text("hello", max_tokens=4))[0] == "hell"
            async with AsyncClient(server.address, timeout=10) as client:
                assert (await client.generate_text("hello", max_tokens=4))[0] == "hell"

    run(body())


@contextmanager
def router_in_thread(**config: Any) -> Iterator[RouterServer]:
    """A keyed router on its own event loop in a thread, for blocking callers (the CLI, httpx)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    router = keyed_router(**config)
    try:
        server, _ = asyncio.run_coroutine_threadsafe(router.__aenter__(), loop).result(30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(router.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_cli_client_commands_read_tandem_api_key() -> None:
    runner = CliRunner()
    with router_in_thread() as server:
        address = server.address
        for command in (["generate", "hello", "--max-tokens", "4"], ["status"]):
            args = [*command, "--address", address]
            result = runner.invoke(app, args, env={"TANDEM_API_KEY": KEY})
            assert result.exit_code == 0, result.output
            result = runner.invoke(app, args, env={"TANDEM_API_KEY": None})
            assert result.exit_code == 1 and "UNAUTHENTICATED" in result.output
            assert "TANDEM_API_KEY" in result.output and "Traceback" not in result.output
        result = runner.invoke(
            app, ["generate", "hello", "--address", address], env={"TANDEM_API_KEY": KEY}
        )
        assert result.output.startswith("hellohello")


def test_serve_refuses_a_weak_key_before_starting() -> None:
    result = CliRunner().invoke(app, ["serve", "--device", "cpu", "--api-key", "short"])
    assert result.exit_code == 1 and "error: --api-key:" in result.output
    assert "short" not in result.output.replace("--api-key", "")


# -- the HTTP door ------------------------------------------------------------------------------

HTTP_KEYLESS = {"/health", "/metrics"}


def http_routes(server: RouterServer) -> list[tuple[str, str]]:
    """(method, path) of every route of the app the server serves (its own factory, arguments)."""
    from fastapi.routing import APIRoute

    from router.http.app import create_app

    app = create_app(
        server.config, ByteTokenizer(), server.registry, server.orchestrator, server.metrics
    )
    assert all(isinstance(r, APIRoute) for r in app.routes), app.routes  # nothing else to check
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    return sorted(
        (m, r.path.replace("{", "").replace("}", "")) for r in routes for m in r.methods or ()
    )


def http_status(port: int, method: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """One request with an empty JSON body; the status and the body's text."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, b"{}", {**headers, "content-type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_every_http_route_needs_the_key_except_health_and_metrics() -> None:
    with router_in_thread(http_port=0) as server:
        routes = http_routes(server)
        assert {path for _, path in routes} >= {"/v1/chat/completions", *HTTP_KEYLESS}
        for method, path in routes:
            for metadata in [(), *WRONG_KEYS[:4]]:
                status, text = http_status(server.http_port, method, path, dict(metadata))
                if path in HTTP_KEYLESS:
                    assert status != 401, (method, path, metadata)
                else:
                    assert status == 401, (method, path, metadata, status, text)
                    assert "API key" in text and KEY not in text
            for metadata in RIGHT_KEYS:
                status, text = http_status(server.http_port, method, path, dict(metadata))
                assert status != 401, (method, path, text)


# -- plumbing: spec -> launch -> RouterConfig; serve -> ClusterConfig -> RouterConfig ----------


def _spec(router: dict[str, Any]) -> Any:
    spec = yaml.safe_load((REPO / "deploy" / "tandem.yaml").read_text())
    spec["router"] = {**spec["router"], "tls": {"enabled": False}, **router}
    return parse_spec(spec)


def _nodes() -> list[NodeInfo]:
    head = NodeInfo("h", "10.0.0.1", {"CPU": 8, "node:__internal_head__": 1}, {}, True)
    prefill = NodeInfo("p", "10.0.0.2", {"CPU": 96, "GPU": 8, "tandem_prefill": 8}, {}, False)
    decode = NodeInfo("d", "10.0.0.3", {"CPU": 96, "GPU": 8, "tandem_decode": 8}, {}, False)
    return [head, prefill, decode]


def test_spec_key_reaches_the_router_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = {"max_model_len": 4096, "vocab_size": 1000, "kv_salt": ""}
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("SPEC_TEST_KEY", KEY)
    for router in ({"api_key_file": str(key_file)}, {"api_key_env": "SPEC_TEST_KEY"}):
        spec = _spec(router)
        config = router_config(spec, plan_cluster(spec, _nodes()), info, True, spec_api_key(spec))
        assert config.api_key == KEY
    assert spec_api_key(_spec({})) is None
    monkeypatch.delenv("SPEC_TEST_KEY")
    with pytest.raises(LaunchError) as err:
        spec_api_key(_spec({"api_key_env": "SPEC_TEST_KEY"}))
    assert err.value.field == "router.api_key_env"


def test_cluster_config_key_reaches_the_router_config() -> None:
    cluster = LocalCluster(ClusterConfig(api_key=KEY))
    cluster.info = {"max_model_len": 256, "vocab_size": 256, "kv_salt": ""}
    assert cluster._router_config().api_key == KEY
