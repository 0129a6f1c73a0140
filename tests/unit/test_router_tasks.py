"""router.tasks.cancel_and_wait stops a task even when its first cancel is swallowed (what
`asyncio.wait_for` can do before Python 3.12, which hung the router's stop), and raises the error
of a task that failed."""

from __future__ import annotations

import asyncio

import pytest

from router.tasks import cancel_and_wait


async def _swallows_first_cancel(cancels: list[int]) -> None:
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancels.append(1)
            if len(cancels) == 1:
                continue  # the lost cancel: the loop goes on
            raise


def test_a_swallowed_cancel_is_repeated_until_the_task_stops() -> None:
    async def main() -> list[int]:
        cancels: list[int] = []
        task = asyncio.get_running_loop().create_task(_swallows_first_cancel(cancels))
        await asyncio.sleep(0)
        stopping = asyncio.get_running_loop().create_task(cancel_and_wait(task))
        await asyncio.wait({stopping}, timeout=3)
        assert stopping.done(), "cancel_and_wait hung on a swallowed cancel"
        assert task.cancelled()
        return cancels

    assert len(asyncio.run(main())) == 2


def test_a_failed_task_raises_its_error_and_none_is_a_no_op() -> None:
    async def boom() -> None:
        raise ValueError("boom")

    async def main() -> None:
        await cancel_and_wait(None)
        task = asyncio.get_running_loop().create_task(boom())
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="boom"):
            await cancel_and_wait(task)

    asyncio.run(main())
