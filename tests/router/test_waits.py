"""The request path's cheap waits (router.tasks): `first_done` in place of asyncio.wait
FIRST_COMPLETED, `within` in place of asyncio.wait_for."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from router.tasks import first_done, within


def run(body: Any) -> Any:
    return asyncio.run(asyncio.wait_for(body, 5))


def test_first_done_returns_when_any_future_is_done_and_leaves_no_callback() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        loop.call_later(0.01, b.set_result, 7)
        await first_done(a, b)
        assert b.done() and not a.done()
        assert not a._callbacks  # type: ignore[attr-defined]

    run(body())


def test_first_done_returns_at_once_when_one_is_already_done() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        done, pending = loop.create_future(), loop.create_future()
        done.set_exception(RuntimeError("read by nobody here"))
        await first_done(pending, done)
        assert not pending.done()
        done.exception()  # mark it retrieved

    run(body())


def test_first_done_cancelled_caller_leaves_the_futures_alone() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        a = loop.create_future()
        waiting = asyncio.ensure_future(first_done(a))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert not a.done() and not a._callbacks  # type: ignore[attr-defined]

    run(body())


def test_within_returns_the_result_or_times_out() -> None:
    async def body() -> None:
        assert await within(asyncio.sleep(0, result=3), 1.0) == 3
        with pytest.raises(asyncio.TimeoutError):
            await within(asyncio.sleep(10), 0.01)

    run(body())


def test_within_lets_an_outside_cancel_through() -> None:
    async def body() -> None:
        task = asyncio.ensure_future(within(asyncio.sleep(10), 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(body())
