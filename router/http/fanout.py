"""A body's choices served side by side: one router flow per choice, their batches merged.

`serve_choices(orch, metrics, prepared)` runs `Orchestrator.generate` for every GenerateRequest of
`prepared`, each in its own task (`_pump`), and yields `(choice index, OutputBatch)` as batches
arrive, until every choice's final batch is out. Each flow is observed by its own
`RouterMetrics.request(...)` observer (`observed`), exactly as the gRPC door observes a Generate,
so HTTP traffic shows in the same series.

Exits, and what they free:
- a flow fails (RequestError): the error is raised to the caller and the sibling flows are
  cancelled, which aborts them on their workers;
- the caller stops iterating (a client that left: starlette cancels the task; a plain response
  whose client left: the front door cancels it) or the generator is closed: every flow still
  running is cancelled, which aborts it on both pools. Each flow runs inside
  `contextlib.aclosing`, so its abort happens at once, not when a generator is collected;
- `prepared.deadline_mono` passes: RequestError(DEADLINE_EXCEEDED), the flows cancelled.
Hazard: the pumps are cancelled, not awaited, on the way out: under anyio's level-triggered
cancellation (starlette's task groups) an await in a cancelled scope raises again at once. Each
pump's own task runs its flow's abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

from router import convert
from router.errors import ErrorKind, RequestError, log_failure
from router.flow import Orchestrator
from router.http.requests import Prepared
from router.metrics import RouterMetrics
from router.request import GenerateRequest, OutputBatch, RequestTrace

log = logging.getLogger(__name__)
Event = tuple[int, OutputBatch]
_Item = tuple[int, OutputBatch | RequestError]


async def observed(
    orch: Orchestrator, metrics: RouterMetrics, req: GenerateRequest
) -> AsyncGenerator[OutputBatch, None]:
    """One flow's batches, observed by the router's metrics; its failures logged like the gRPC
    door's (INTERNAL, UNAVAILABLE, DEADLINE_EXCEEDED). A bug surfaces as RequestError INTERNAL."""
    observer = metrics.request(req.slo_class, req.slo)
    trace = RequestTrace(req.request_id)
    try:
        async with aclosing(orch.generate(req, trace)) as batches:
            async for batch in batches:
                observer.on_message(convert.response(batch))
                yield batch
    except RequestError as exc:
        if exc.reason is not None:
            observer.rejected(exc.reason)
        else:
            observer.failed(exc.kind.name)
        log_failure(log, "HTTP request", trace, exc.kind, exc.details)
        raise
    except (asyncio.CancelledError, GeneratorExit):  # the client left, or the deadline passed
        passed = req.deadline is not None and time.time() >= req.deadline
        kind = ErrorKind.DEADLINE_EXCEEDED if passed else ErrorKind.CANCELLED
        observer.failed(kind.name)
        log_failure(log, "HTTP request", trace, kind, "the request's deadline passed")
        raise
    except Exception as exc:  # a bug: the caller is told INTERNAL, the log has the traceback
        observer.failed(ErrorKind.INTERNAL.name)
        log_failure(log, "HTTP request", trace, ErrorKind.INTERNAL, repr(exc), exc)
        raise RequestError(ErrorKind.INTERNAL, "internal error") from exc


async def _pump(
    index: int, batches: AsyncGenerator[OutputBatch, None], queue: asyncio.Queue[_Item]
) -> None:
    """Move one flow's batches (or its error) into the shared queue."""
    try:
        async with aclosing(batches):
            async for batch in batches:
                queue.put_nowait((index, batch))
    except RequestError as exc:
        queue.put_nowait((index, exc))


async def serve_choices(
    orch: Orchestrator, metrics: RouterMetrics, prepared: Prepared
) -> AsyncGenerator[Event, None]:
    """Every choice's batches, merged as they come (module docstring: exits)."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    pumps = [
        asyncio.ensure_future(_pump(k, observed(orch, metrics, req), queue))
        for k, req in enumerate(prepared.choices)
    ]
    running = len(pumps)
    try:
        while running:
            index, item = await _next(queue, prepared.deadline_mono)
            if isinstance(item, RequestError):
                raise item
            running -= item.is_final
            yield index, item
    finally:
        for pump in pumps:
            pump.cancel()


async def _next(queue: asyncio.Queue[_Item], deadline_mono: float | None) -> _Item:
    if deadline_mono is None:
        return await queue.get()
    try:
        return await asyncio.wait_for(queue.get(), max(0.0, deadline_mono - time.monotonic()))
    except TimeoutError:
        raise RequestError(
            ErrorKind.DEADLINE_EXCEEDED, "the request's deadline (x-tandem-timeout-s) passed"
        ) from None
