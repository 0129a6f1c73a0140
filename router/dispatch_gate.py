"""The router queue: at most `capacity` requests in their prefill stage, the rest wait in EDF order.

A slot is held from placement until the first token is out; decode concurrency is bounded by KV
headroom instead. The queue is bounded (`max_queue`): beyond it `RouterQueueFullError` (the
server answers RESOURCE_EXHAUSTED) rather than an unbounded wait. A waiter that is cancelled
(client gone, deadline) leaves the queue; if a slot was handed to it in the same instant, the
slot is passed on, never leaked.
"""

from __future__ import annotations

import asyncio
import time

from router.edf_queue import EdfQueue


class RouterQueueFullError(RuntimeError):
    pass


class DispatchGate:
    def __init__(self, capacity: int, max_queue: int, starvation_s: float) -> None:
        assert capacity >= 1 and max_queue >= 0
        self._capacity = capacity
        self._max_queue = max_queue
        self._in_use = 0
        self._queue: EdfQueue[asyncio.Future[None]] = EdfQueue(starvation_s)

    @property
    def num_in_use(self) -> int:
        return self._in_use

    @property
    def num_waiting(self) -> int:
        return len(self._queue)

    async def acquire(self, priority: int, deadline: float | None) -> None:
        """Wait for a slot (EDF by (priority, deadline monotonic s)). Pair with `release()`."""
        if self._in_use < self._capacity and len(self._queue) == 0:
            self._in_use += 1
            return
        if len(self._queue) >= self._max_queue:
            raise RouterQueueFullError(f"the router queue is full ({self._max_queue} waiting)")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._queue.push(waiter, priority=priority, deadline=deadline, now=time.monotonic())
        try:
            await waiter
        except asyncio.CancelledError:
            if not self._queue.remove(entry) and waiter.done() and not waiter.cancelled():
                self.release()  # the slot was ours already: pass it on
            raise

    def release(self) -> None:
        """Hand the slot to the best waiter, or free it."""
        now = time.monotonic()
        while len(self._queue):
            waiter = self._queue.pop(now)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._in_use -= 1
        assert self._in_use >= 0
