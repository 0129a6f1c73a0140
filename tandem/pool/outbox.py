"""The output stream of a worker: engine-thread producers, one asyncio long-poll consumer.

The engine thread appends every step's outputs (`step_output` turns an engine output into the
contract's message); `next_outputs` (the router's long poll) takes everything produced since
its last call, waking as soon as anything arrives.
"""

from __future__ import annotations

import asyncio
import threading

from engine.outputs import RequestOutput
from tandem.contract.worker_api import StageTimes, StepOutput


def step_output(out: RequestOutput, timings: StageTimes | None = None) -> StepOutput:
    """The message for one engine output: this step's tokens and text, the newest logprobs
    entry, and `timings` (set on a request's last output)."""
    return StepOutput(
        request_id=out.request_id,
        new_token_ids=tuple(out.new_token_ids),
        text_delta=out.text_delta,
        finished=out.finished,
        finish_reason=out.finish_reason,
        logprobs=tuple(out.logprobs[-1:]) if out.logprobs else (),
        timings=timings,
        error=out.error,
    )


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[StepOutput] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self) -> None:
        """Capture the consumer's event loop (call from an async method before any output)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._event = asyncio.Event()

    def put(self, outputs: list[StepOutput]) -> None:
        """Any thread: append outputs and wake the consumer."""
        if not outputs:
            return
        with self._lock:
            self._items.extend(outputs)
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    def _take(self) -> list[StepOutput]:
        with self._lock:
            items, self._items = self._items, []
        return items

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        self.bind()
        assert self._event is not None
        items = self._take()
        if items:
            return items
        self._event.clear()
        items = self._take()  # an output may have landed between take and clear
        if items:
            return items
        try:
            await asyncio.wait_for(self._event.wait(), max_wait_s)
        except asyncio.TimeoutError:
            pass
        return self._take()
