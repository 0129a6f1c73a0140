"""Background asyncio tasks of the router: stopped by cancelling and awaiting, failing loudly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
_TIMEOUT: Any = getattr(asyncio, "timeout", None)  # Python 3.11+


CANCEL_RETRY_S = 0.1


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` (if any) and wait until it has stopped; its error, if it failed, is raised.

    Hazard: on Python < 3.12 `asyncio.wait_for` can swallow a cancel that lands as its inner
    await completes (CPython gh-86296), and a polling loop then simply goes on; a single
    `cancel()` + `await task` would wait forever. So the cancel is repeated until it takes."""
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_RETRY_S)
    with contextlib.suppress(asyncio.CancelledError):
        task.result()


def fail_loudly(task: asyncio.Task[Any]) -> None:
    """Done-callback: a background task that died of an error is logged, never silent."""
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s died", task.get_name(), exc_info=task.exception())


async def within(call: Awaitable[T], timeout_s: float) -> T:
    """`await call`, raising TimeoutError (`asyncio.TimeoutError`) after `timeout_s` seconds.

    On Python 3.11+ through `asyncio.timeout`, which runs `call` in the caller's task:
    `asyncio.wait_for` wraps it in a task of its own, one more task and one more event-loop
    hop per call (on a hot path such as the demultiplexer's poll, once per engine step).
    Before 3.11, `asyncio.wait_for`."""
    if _TIMEOUT is None:
        return await asyncio.wait_for(call, timeout_s)
    async with _TIMEOUT(timeout_s):
        return await call


async def first_done(*futures: asyncio.Future[Any]) -> None:
    """Wait until one of `futures` is done (at once if one is); never cancels or reads them.

    `asyncio.wait(..., return_when=FIRST_COMPLETED)` without its sets, copies and result sets:
    the request path waits like this on every worker call (the call, the worker's `down`,
    the request's `stop`). A cancel of the caller propagates; the futures are left as they are."""
    if any(f.done() for f in futures):
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for future in futures:
        future.add_done_callback(wake)
    try:
        await waiter
    finally:
        for future in futures:
            future.remove_done_callback(wake)
