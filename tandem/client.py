"""Python client of the Tandem router (`tandem.v1.Generation`).

    with tandem.Client("127.0.0.1:50051") as client:
        for chunk in client.generate("Hello", max_tokens=32, slo="interactive"):
            print(chunk.text_delta, end="")

`generate` yields `GenerateResponse` messages (token_ids, text_delta, logprobs; the last one
also finish_reason, prompt_tokens, completion_tokens and timings). Leaving the loop early
cancels the RPC, which aborts the request in the cluster. Every failure surfaces as
`TandemClientError` with the gRPC status code and details ("field: message" for bad input).
`AsyncClient` is the same over grpc.aio (`async for chunk in client.generate(...)`).
A router that requires an API key needs `Client(address, api_key=...)`; without it every call
but `health()` fails UNAUTHENTICATED.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.api import generation_pb2 as pb
from tandem.api import generation_pb2_grpc as pb_grpc

Prompt = str | Sequence[int] | Sequence[dict[str, str]]
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class TandemClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Slo:
    """Explicit SLO targets (milliseconds) and/or a named class; see GenerateRequest."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    slo_class: str | None = None


def _error(exc: grpc.RpcError) -> TandemClientError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TandemClientError(code, details or "")


def structured_output(spec: Any) -> pb.StructuredOutput:
    """`structured=` of `generate`: a pb.StructuredOutput, or one of {"json_schema": schema
    (a dict or its JSON text)}, {"json_object": True}, {"regex": str}, {"ebnf": str}."""
    if isinstance(spec, pb.StructuredOutput):
        return spec
    (kind, value), *rest = dict(spec).items()
    if rest:
        raise ValueError("structured: give exactly one of json_schema, json_object, regex, ebnf")
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    return pb.StructuredOutput(**{kind: value})


def build_request(
    prompt: Prompt,
    *,
    request_id: str | None = None,
    slo: str | Slo | None = None,
    priority: int | None = None,
    best_effort: bool | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from a text prompt, token ids or chat messages ({"role", "content"}).
    Sampling fields as keywords; `structured` see `structured_output`, `logit_bias` a
    {token id: bias} dict."""
    if sampling.get("structured") is not None:
        sampling["structured"] = structured_output(sampling["structured"])
    req = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        req.text = prompt
    elif len(prompt) > 0 and isinstance(prompt[0], dict):
        messages = cast(list[dict[str, str]], prompt)
        req.chat.messages.extend(
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages
        )
    else:
        req.token_ids.ids.extend(prompt)  # type: ignore[arg-type]
        if not prompt:
            req.token_ids.SetInParent()  # an explicit (empty) token prompt, which the server rejects
    if request_id is not None:
        req.request_id = request_id
    if isinstance(slo, str):
        req.slo_class = slo
    elif isinstance(slo, Slo):
        for name in ("ttft_ms", "tpot_ms", "slo_class"):
            if getattr(slo, name) is not None:
                setattr(req, name, getattr(slo, name))
    if priority is not None:
        req.priority = priority
    if best_effort is not None:
        req.best_effort = best_effort
    return req


def _health_name(status: int) -> str:
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))


@dataclass(frozen=True)
class Tls:
    """TLS to the router: the CA that signed its certificate (None: the system roots), and for
    mutual TLS this client's own certificate and key. PEM file paths."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            read(self.ca_file), read(self.key_file), read(self.cert_file)
        )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `api_key` (`authorization: Bearer <key>`); none without.
    Per call, not channel credentials: gRPC sends call credentials over TLS channels only."""
    return () if api_key is None else (("authorization", f"Bearer {api_key}"),)


def _open_channel(api: Any, address: str, tls: Tls | None, max_message_bytes: int) -> Any:
    """A channel from `api`, `grpc` or `grpc.aio` (the same constructors): over TLS when `tls`
    is given, else plaintext; messages up to `max_message_bytes` both ways."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if tls:
        return api.secure_channel(address, tls.credentials(), options=options)
    return api.insecure_channel(address, options=options)


class Client:
    """Blocking client. Thread-safe (one channel); use as a context manager or call `close()`.
    `tls`: connect over TLS (the router's `tls_cert_file`), else plaintext. `api_key`: sent with
    every call, for a router with `api_key` set (in clear text unless `tls` is given)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: Tls | None = None,
        api_key: str | None = None,
    ) -> None:
        self._channel: grpc.Channel = _open_channel(grpc, address, tls, max_message_bytes)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._metadata = auth_metadata(api_key)

    def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Stream a request's responses. `kwargs`: request_id, slo, priority, best_effort, sampling fields."""
        call = self._stub.Generate(
            build_request(prompt, **kwargs),
            timeout=timeout or self._timeout,
            metadata=self._metadata,
        )
        try:
            yield from call
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()  # no-op once finished; aborts the request when the caller stopped early

    def generate_text(self, prompt: Prompt, **kwargs: Any) -> tuple[str, pb.GenerateResponse]:
        """The whole text and the final response (finish_reason, counts, timings)."""
        parts: list[str] = []
        last = pb.GenerateResponse()
        for last in self.generate(prompt, **kwargs):
            parts.append(last.text_delta)
        return "".join(parts), last

    def abort(self, request_id: str) -> bool:
        return bool(self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id)).found)

    def model_info(self) -> pb.ModelInfo:
        return self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    def cluster_status(self) -> pb.ClusterStatus:
        return self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest())

    def health(self, service: str = "") -> str:
        """ "SERVING", "NOT_SERVING", ... for the whole server ("") or a named service."""
        resp = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return _health_name(resp.status)

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client; create and use it inside one running event loop."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: Tls | None = None,
        api_key: str | None = None,
    ) -> None:
        self._channel: grpc.aio.Channel = _open_channel(grpc.aio, address, tls, max_message_bytes)
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout
        self._metadata = auth_metadata(api_key)

    async def generate(
        self, prompt: Prompt, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = self._stub.Generate(
            build_request(prompt, **kwargs),
            timeout=timeout or self._timeout,
            metadata=self._metadata,
        )
        try:
            async for msg in call:
                yield msg
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def generate_text(self, prompt: Prompt, **kwargs: Any) -> tuple[str, pb.GenerateResponse]:
        parts: list[str] = []
        last = pb.GenerateResponse()
        async for last in self.generate(prompt, **kwargs):
            parts.append(last.text_delta)
        return "".join(parts), last

    async def abort(self, request_id: str) -> bool:
        return bool(
            (await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))).found
        )

    async def model_info(self) -> pb.ModelInfo:
        return await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest())

    async def cluster_status(self) -> pb.ClusterStatus:
        return await self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest())

    async def health(self, service: str = "") -> str:
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return _health_name(resp.status)

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
