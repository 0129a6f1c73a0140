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
its workers, and gRPC reports CANCELLED / DEADLINE_EXCEEDED.

Metrics: `RouterMetrics` (router.metrics) observes every Generate call; with
`config.metrics_port` set, the registry is served over HTTP and its target is listed first in
`GetClusterStatus.metrics_targets`, followed by `config.metrics_targets` and the workers'.

Health: the overall service ("") and "tandem.v1.Generation" are SERVING only while the
registry can serve (>= 1 healthy prefill and decode worker, or a colocated one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from router import convert
from router.config import RouterConfig
from router.errors import ErrorKind, RequestError
from router.flow import Orchestrator
from router.metrics import RequestObserver, RouterMetrics, RouterStateSource
from router.registry import Pool, WorkerRegistry
from router.request import GenerateRequest
from router.tokenizer import Tokenizer
from router.validation import ModelLimits, validate
from tandem.api import generation_pb2 as pb
from tandem.api import generation_pb2_grpc as pb_grpc
from tandem.contract.metrics_http import MetricsEndpoint, serve_registry

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
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
        try:
            await self._stream(req, context, observer)
        except RequestError as exc:
            if exc.reason is not None:
                observer.rejected(exc.reason)
            else:
                observer.failed(status_code(exc.kind).name)
            await self._abort(context, exc)
        except asyncio.CancelledError:  # the client left, or its gRPC deadline passed
            expired = deadline is not None and time.time() >= deadline
            kind = ErrorKind.DEADLINE_EXCEEDED if expired else ErrorKind.CANCELLED
            observer.failed(status_code(kind).name)
            raise
        except Exception:
            observer.failed(status_code(ErrorKind.INTERNAL).name)
            raise

    async def _stream(
        self, req: GenerateRequest, context: grpc.aio.ServicerContext, observer: RequestObserver
    ) -> None:
        """Write every batch of the flow as a GenerateResponse (leaving early aborts it)."""
        async with aclosing(self._orch.generate(req)) as batches:
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
        server = grpc.aio.server(options=options)
        pb_grpc.add_GenerationServicer_to_server(self._servicer, server)
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

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.registry.stop()
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
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)
