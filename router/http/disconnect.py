"""Work that stops when the HTTP client leaves.

`until_disconnect(receive, work)` runs `work` (building a plain response, or waiting for a
stream's first batch) and cancels it if the client disconnects first: cancelling closes the
flows it iterates (router/http/fanout.py), which aborts their requests on both pools. A
streamed response needs no watcher of its own once it started: starlette listens for the
disconnect and cancels the streaming task itself.

Hazard: this reads the request's `receive` channel after the body was read, which yields only
`http.disconnect` (ASGI); it must not run while anything else still reads the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientLeft(Exception):
    """The client disconnected before the work was done; nobody is left to answer."""


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result (or exception); raises ClientLeft once it was cancelled because the
    client disconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientLeft()
    return task.result()
