"""Background asyncio tasks of the router: stopped by cancelling and awaiting, failing loudly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


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
