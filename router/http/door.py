"""Serving a prepared body: a plain JSON response, or a stream of server-sent events.

`Door` holds what both completion endpoints share (the model, the Orchestrator, the metrics).
`respond` runs every choice to its end and folds the batches into one JSON response; `stream`
waits for the first batch before it commits to a 200 and an event stream, so a request the
router refuses before any prefill (RESOURCE_EXHAUSTED: an SLO nobody can meet, a full queue;
UNAVAILABLE: no healthy worker) is answered with its own status (429 with Retry-After, 503),
never as an error event inside a 200. Later failures are error events (router/http/streaming.py).

Both stop when the client leaves (router/http/disconnect.py), which aborts the requests on
their workers; the deadline (`x-tandem-timeout-s`) is enforced by the merged flows
(router/http/fanout.py): 504 before the stream starts, an error event after.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, Protocol

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from router.errors import RequestError
from router.flow import Orchestrator
from router.http.disconnect import ClientLeft, until_disconnect
from router.http.errors import ApiError
from router.http.fanout import Event, serve_choices
from router.http.logprobs import TokenText
from router.http.requests import Model, Prepared
from router.http.streaming import MEDIA_TYPE, Chunks, ClosingStreamingResponse, sse_stream
from router.metrics import RouterMetrics

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # proxies: no buffering


class Fold(Protocol):
    def on_event(self, event: Event) -> None: ...

    def response(self) -> dict[str, Any]: ...


class Door:
    def __init__(self, model: Model, orch: Orchestrator, metrics: RouterMetrics) -> None:
        self.model = model
        self.texts = TokenText(model.tokenizer)
        self._orch = orch
        self._metrics = metrics

    def rejected(self, exc: ApiError) -> ApiError:
        """Count a body refused before serving (like the gRPC door's invalid requests)."""
        if exc.status == 400:
            self._metrics.reject_invalid()
        return exc

    async def respond(self, request: Request, prepared: Prepared, fold: Fold) -> Response:
        async def collect() -> dict[str, Any]:
            async with aclosing(serve_choices(self._orch, self._metrics, prepared)) as events:
                async for event in events:
                    fold.on_event(event)
            return fold.response()

        try:
            body = await until_disconnect(request.receive, collect())
        except RequestError as exc:
            raise ApiError.from_request_error(exc, prepared.renames) from None
        except ClientLeft:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(body)

    async def stream(self, request: Request, prepared: Prepared, chunks: Chunks) -> Response:
        events = serve_choices(self._orch, self._metrics, prepared)

        async def first() -> Event:
            return await anext(events)

        try:
            head = await until_disconnect(request.receive, first())
        except RequestError as exc:
            await events.aclose()
            raise ApiError.from_request_error(exc, prepared.renames) from None
        except ClientLeft:
            await events.aclose()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = sse_stream(events, [head], chunks, prepared.renames)
        return ClosingStreamingResponse(body, media_type=MEDIA_TYPE, headers=_SSE_HEADERS)
