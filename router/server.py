"""The router's gRPC front door: `tandem.v1.Generation`, grpc.health.v1, optional reflection.

`RouterServer` owns an asyncio gRPC server bound to `config.host` (127.0.0.1 by default), the
worker registry with its heartbeats, and the Orchestrator. Requests larger than
`config.max_message_bytes` are refused by gRPC itself with RESOURCE_EXHAUSTED. Generate:
validate the protobuf into the plain `router.request.GenerateRequest` (INVALID_ARGUMENT
"field: message", nothing sent to a worker) -> iterate `Orchestrator.generate` (see
`router.flow`), each plain OutputBatch written as a GenerateResponse (`router.convert`). This
file is the only one that knows gRPC: a `RequestError`'s kind maps to its status code
(`STATUS_CODES`), a refusal's retry hint to the `grpc-retry-pushback-ms` trailer. A client
cancel or an expired gRPC deadline cancels the handler; leaving the flow aborts the request on
its workers, and gRPC reports CANCELLED / DEADLINE_EXCEEDED. Which of the two it was, gRPC does
not say: a client's expired deadline reaches the server as a cancel, often a moment before the
server's own copy of the deadline passes, so a cancel within `DEADLINE_SLACK_S` of the deadline
counts as the deadline. A request whose bytes do not parse (a string field that is not UTF-8)
is INVALID_ARGUMENT naming the field (`_DecodeCheck`), never gRPC's UNKNOWN with protobuf's
error text. Every request that ends INTERNAL, UNAVAILABLE or DEADLINE_EXCEEDED logs one line:
its request id, the stage it reached (`router.request.Stage`) and why.

Metrics: `RouterMetrics` (router.metrics) observes every Generate call; with
`config.metrics_port` set, the registry is served over HTTP and its target is listed first in
`GetClusterStatus.metrics_targets`, followed by `config.metrics_targets` and the workers'.

API keys: with `config.api_key` set, every call but health needs `authorization: Bearer <key>`
(`router.auth.ApiKeyInterceptor`, ahead of every other interceptor), else UNAUTHENTICATED.

Health: the overall service ("") and "tandem.v1.Generation" are SERVING only while the
registry can serve (>= 1 healthy prefill and decode worker, or a colocated one) and the router
is not draining (`drain()`: NOT_SERVING, new requests refused, running ones finish).

HTTP: with `config.http_port` set, the OpenAI-compatible API (router/http/, a sibling of this
door over the same Orchestrator, registry and metrics) is served by uvicorn on `config.host`,
as a task on this event loop; `http_port` is the bound port. `stop()` stops it first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router import convert
from router.auth import ApiKeyInterceptor
from router.config import RouterConfig
from router.errors import ErrorKind, RequestError, log_failure
from router.flow import Orchestrator
from router.metrics import RequestObserver, RouterMetrics, RouterStateSource
from router.registry import Pool, WorkerRegistry
from router.request import GenerateRequest, RequestTrace
from router.tokenizer import Tokenizer
from router.undecodable import bad_utf8_field
from router.validation import ModelLimits, validate
from tandem.api import generation_pb2 as pb
from tandem.api import generation_pb2_grpc as pb_grpc
from tandem.contract.metrics_http import MetricsEndpoint, serve_registry

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Generation"]
SERVICE_NAME = SERVICE.full_name
DEADLINE_SLACK_S = 0.25  # a cancel this close to the call's deadline is the deadline passing
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"  # gRPC's server pushback (A6 retries)
STATUS_CODES: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    return STATUS_CODES[kind]


def trailing_metadata(exc: RequestError) -> tuple[tuple[str, str], ...]:
    """The refusal's retry hint as gRPC server pushback (milliseconds); none otherwise."""
    if exc.retry_after_s is None:
        return ()
    return ((RETRY_PUSHBACK_KEY, str(max(0, round(exc.retry_after_s * 1000)))),)


def expired(deadline: float | None, now: float | None = None) -> bool:
    """Whether a cancel at `now` (UNIX seconds) is the call's `deadline` passing: a client's
    deadline reaches the server as a cancel, up to `DEADLINE_SLACK_S` before the server's copy."""
    now = time.time() if now is None else now
    return deadline is not None and now >= deadline - DEADLINE_SLACK_S


class _Undecodable(NamedTuple):
    """A request whose bytes protobuf refused to parse, in place of the message."""

    message: Descriptor
    data: bytes
    error: str


class _DecodeCheck(grpc.aio.ServerInterceptor):
    """The Generation service's requests whose bytes do not parse end INVALID_ARGUMENT with a
    log line, naming the field when a string is not UTF-8 (gRPC alone answers UNKNOWN with
    protobuf's exception text). An undecodable Generate counts as an invalid request.

    The server applies `wrap` once to each Generation handler (`add_generation_service`),
    not as an interceptor: gRPC runs interceptors on every call (about 0.1 ms of a Generate's
    latency at one stream on 2 cores); `intercept_service` does the same per call."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        service, _, name = handler_call_details.method.lstrip("/").partition("/")
        if handler is None or service != SERVICE_NAME:
            return handler
        return self.wrap(name, handler)

    def wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The Generation method `name`'s `handler`, its deserializer lenient (streaming
        requests, which Generation has none of, are returned as they are)."""
        if handler.request_streaming:
            return handler
        message = SERVICE.methods_by_name[name].input_type
        parse = handler.request_deserializer

        def lenient(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return _Undecodable(message, data, str(exc))

        serve = handler.unary_stream if handler.response_streaming else handler.unary_unary

        async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await self._refuse(name, request, context)
            return await serve(request, context)

        make = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return make(
            checked, request_deserializer=lenient, response_serializer=handler.response_serializer
        )

    async def _refuse(
        self, method: str, request: _Undecodable, context: grpc.aio.ServicerContext
    ) -> NoReturn:
        field = bad_utf8_field(request.message, request.data)
        details = (
            f"{field}: not valid UTF-8"
            if field is not None
            else f"request: not a valid {request.message.full_name}"
        )
        log.warning(
            "%s from %s refused, its bytes do not parse: %s (%s)",
            method,
            context.peer(),
            details,
            request.error,
        )
        if method == "Generate":
            self._metrics.reject_invalid()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)
        raise AssertionError("grpc.aio's context.abort returned")


class _HandlerRecorder:
    """Stands in for a server to `add_GenerationServicer_to_server`: keeps its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come to add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.update(handlers)


def add_generation_service(
    servicer: pb_grpc.GenerationServicer, server: grpc.aio.Server, check: _DecodeCheck
) -> None:
    """`add_GenerationServicer_to_server`, each handler's deserializer made lenient once
    (`_DecodeCheck.wrap`) rather than by an interceptor on every call."""
    recorder = _HandlerRecorder()
    pb_grpc.add_GenerationServicer_to_server(servicer, recorder)
    assert set(recorder.handlers) == set(SERVICE.methods_by_name), "generated code changed"
    handlers = {name: check.wrap(name, h) for name, h in recorder.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(
        self,
        config: RouterConfig,
        tokenizer: Tokenizer,
        registry: WorkerRegistry,
        orch: Orchestrator,
        metrics: RouterMetrics,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self.own_metrics_target: str | None = None
        self._tokenizer = tokenizer
        self._registry = registry
        self._orch = orch
        vocab = config.vocab_size if config.vocab_size is not None else tokenizer.vocab_size
        self._limits = ModelLimits(config.max_model_len, vocab)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.time() + remaining
        try:
            classes = self._config.slo_classes
            req = validate(request, self._tokenizer, self._limits, classes, deadline)
        except RequestError as exc:
            self._metrics.reject_invalid()
            await self._abort(context, exc)
        observer = self._metrics.request(req.slo_class, req.slo)
        progress = RequestTrace(req.request_id)
        try:
            await self._stream(req, context, observer, progress)
        except RequestError as exc:
            if exc.reason is not None:
                observer.rejected(exc.reason)
            else:
                observer.failed(status_code(exc.kind).name)
            log_failure(log, "request", progress, exc.kind, exc.details)
            await self._abort(context, exc)
        except asyncio.CancelledError:  # the client left, or the call's deadline passed
            kind = ErrorKind.DEADLINE_EXCEEDED if expired(deadline) else ErrorKind.CANCELLED
            observer.failed(status_code(kind).name)
            log_failure(log, "request", progress, kind, "the call's deadline passed")
            raise
        except Exception as exc:  # a bug: the caller is told INTERNAL, the log has the traceback
            observer.failed(status_code(ErrorKind.INTERNAL).name)
            log_failure(log, "request", progress, ErrorKind.INTERNAL, repr(exc), exc_info=exc)
            await self._abort(context, RequestError(ErrorKind.INTERNAL, "internal error"))

    async def _stream(
        self,
        req: GenerateRequest,
        context: grpc.aio.ServicerContext,
        observer: RequestObserver,
        progress: RequestTrace,
    ) -> None:
        """Write every batch of the flow as a GenerateResponse (leaving early aborts it)."""
        async with aclosing(self._orch.generate(req, progress)) as batches:
            async for batch in batches:
                msg = convert.response(batch)
                observer.on_message(msg)
                await context.write(msg)

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: RequestError) -> NoReturn:
        """End the call with the error's status code: `context.abort` raises."""
        await context.abort(status_code(exc.kind), exc.details, trailing_metadata(exc))
        raise AssertionError("grpc.aio's context.abort returned")

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        return pb.AbortResponse(found=self._orch.abort(request.request_id))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return pb.ModelInfo(
            model=self._config.model_name,
            max_model_len=self._config.max_model_len,
            vocab_size=self._limits.vocab_size,
            eos_token_ids=list(self._tokenizer.eos_token_ids),
            slo_classes=sorted(self._config.slo_classes),
        )

    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        now = time.monotonic()
        targets = [self.own_metrics_target] if self.own_metrics_target else []
        targets += list(self._config.metrics_targets)
        targets += [e.metrics_target for e in self._registry.entries() if e.metrics_target]
        return pb.ClusterStatus(
            workers=[convert.worker_status(e, now) for e in self._registry.entries()],
            metrics_targets=targets,
        )


class RouterServer:
    """Lifecycle: `await start()` -> `await add_worker(...)` ... -> `await stop()`.

    One event loop."""

    def __init__(self, config: RouterConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.registry = WorkerRegistry(config.heartbeat_interval_s, config.heartbeat_timeout_s)
        self.orchestrator = Orchestrator(self.registry, config)
        self.metrics = RouterMetrics(config.model_name, config.slo_classes)
        self.metrics.watch(self._state_source())
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._servicer = GenerationServicer(
            config, tokenizer, self.registry, self.orchestrator, self.metrics
        )
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.http_port = 0  # the HTTP API's bound port, once started (config.http_port set)
        self._tokenizer = tokenizer
        self._http: Any = None  # router.http.serving.HttpServer, imported only when used
        self.registry.on_serving_change(self._on_serving_change)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def _bind(self, server: grpc.aio.Server) -> int:
        """The client port: TLS when the config names a certificate, else plaintext."""
        address = f"{self.config.host}:{self.config.port}"
        c = self.config
        if c.tls_cert_file is None or c.tls_key_file is None:
            return server.add_insecure_port(address)
        key, cert = Path(c.tls_key_file).read_bytes(), Path(c.tls_cert_file).read_bytes()
        ca = Path(c.tls_client_ca_file).read_bytes() if c.tls_client_ca_file else None
        creds = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )
        return server.add_secure_port(address, creds)

    async def start(self) -> None:
        limit = self.config.max_message_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.config.api_key is not None:  # a call without the key reaches no handler
            interceptors.append(ApiKeyInterceptor(self.config.api_key))
        server = grpc.aio.server(options=options, interceptors=interceptors)
        add_generation_service(self._servicer, server, _DecodeCheck(self.metrics))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        await self._set_health(False)
        if self.config.enable_reflection:
            from grpc_reflection.v1alpha import reflection  # optional dependency

            names = (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, server)
        self.port = self._bind(server)
        if self.port == 0:
            raise OSError(f"cannot bind {self.config.host}:{self.config.port}")
        await server.start()
        self._server = server
        self.registry.start()
        if self.config.metrics_port is not None:
            host = self.config.metrics_host or self.config.host
            self.metrics_endpoint = serve_registry(
                self.metrics.registry, host, self.config.metrics_port
            )
            self._servicer.own_metrics_target = self.metrics_endpoint.target
        if self.config.http_port is not None:
            await self._start_http(self.config.http_port)

    async def _start_http(self, port: int) -> None:
        """The HTTP API (fastapi and uvicorn are imported only when it is on)."""
        from router.http.app import create_app
        from router.http.serving import HttpServer

        app = create_app(
            self.config, self._tokenizer, self.registry, self.orchestrator, self.metrics
        )
        self._http = HttpServer(app, self.config.host, port)
        self.http_port = await self._http.start()

    def _state_source(self) -> RouterStateSource:
        orch, registry = self.orchestrator, self.registry
        return RouterStateSource(
            waiting=lambda: orch.num_queued,
            inflight=lambda: orch.num_inflight_prefills,
            active=lambda: orch.num_active,
            workers=lambda: [(e.worker_id, e.pool.value, e.healthy) for e in registry.entries()],
        )

    async def add_worker(
        self, worker_id: str, pool: Pool | str, handle: Any, metrics_target: str | None = None
    ) -> None:
        await self.orchestrator.add_worker(worker_id, Pool(pool), handle, metrics_target)

    async def drain(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Stop taking requests, let the running ones end: health reads NOT_SERVING at once (gRPC
        and HTTP), every new Generate / HTTP completion is refused UNAVAILABLE "draining", and
        this waits until no request is active (their KV transfers included) or `timeout_s`
        passes. True when every request ended in time. One way: call `stop()` after it; the
        servers stay up meanwhile so that running streams can finish."""
        self.orchestrator.drain()
        await self._set_health(False)
        deadline = time.monotonic() + timeout_s
        while self.orchestrator.num_active and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return self.orchestrator.num_active == 0

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.registry.stop()
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        await self.orchestrator.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
            self.metrics_endpoint = None

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    def _on_serving_change(self, serving: bool) -> None:
        # Set whatever holds when the task runs, so quick flips cannot land out of order.
        task = asyncio.ensure_future(self._set_health(None))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _set_health(self, serving: bool | None) -> None:
        if serving is None:
            serving = self.registry.serving
        serving = serving and not self.orchestrator.draining  # draining: NOT_SERVING for good
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)
