"""The router queue: at most `capacity` requests in their prefill stage, the rest wait in EDF order.

A slot is held from placement until the first token is out; decode concurrency is bounded by KV
headroom instead. The queue is bounded (`max_queue`): beyond it `RouterQueueFullError` (the
server answers RESOURCE_EXHAUSTED) rather than an unbounded wait. A waiter that is cancelled
(client gone, deadline) leaves the queue; if a slot was handed to it in the same instant, the
slot is passed on, never leaked.

A request that got a slot but found no KV room (best-effort) gives the slot back and parks
(`wait_for_room`) until `room_freed()`, then queues for a slot again. Parked requests count
against `max_queue` like queued ones (`num_waiting`), so waiting for room is bounded too.
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
        self._parked: list[asyncio.Future[None]] = []

    @property
    def num_in_use(self) -> int:
        return self._in_use

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot plus those parked until KV room frees."""
        return len(self._queue) + len(self._parked)

    @property
    def num_parked(self) -> int:
        return len(self._parked)

    async def acquire(self, priority: int, deadline: float | None) -> None:
        """Wait for a slot (EDF by (priority, deadline monotonic s)). Pair with `release()`."""
        if self._in_use < self._capacity and len(self._queue) == 0:
            self._in_use += 1
            return
        self._check_room_in_queue()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._queue.push(waiter, priority=priority, deadline=deadline, now=time.monotonic())
        try:
            await waiter
        except asyncio.CancelledError:
            if not self._queue.remove(entry) and waiter.done() and not waiter.cancelled():
                self.release()  # the slot was ours already: pass it on
            raise

    async def wait_for_room(self) -> None:
        """Park until the next `room_freed()`. Hold no slot while parked. Raises
        RouterQueueFullError when `max_queue` requests already wait; cancellation unparks."""
        self._check_room_in_queue()
        parked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked.append(parked)
        try:
            await parked
        finally:
            if parked in self._parked:
                self._parked.remove(parked)

    def room_freed(self) -> None:
        """Wake every parked request: each queues for a slot and tries its placement again."""
        parked, self._parked = self._parked, []
        for waiter in parked:
            if not waiter.done():
                waiter.set_result(None)

    def _check_room_in_queue(self) -> None:
        if self.num_waiting >= self._max_queue:
            raise RouterQueueFullError(f"the router queue is full ({self._max_queue} waiting)")

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
