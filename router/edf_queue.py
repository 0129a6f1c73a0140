"""The router queue's order: earliest deadline first within priority, with a starvation guard. Pure.

Order: lower `priority` first, then earlier `deadline` (None sorts last), then arrival. An entry
that has waited longer than `starvation_s` jumps ahead of everything (oldest such entry first),
so low-priority or deadline-less work cannot wait forever behind a steady stream of urgent work.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True)
class _Entry(Generic[T]):
    key: tuple[int, float, int]
    arrival: float = field(compare=False)
    item: T = field(compare=False)
    removed: bool = field(default=False, compare=False)


class EdfQueue(Generic[T]):
    """A priority queue of items with lazy removal. Not thread-safe (one event loop)."""

    def __init__(self, starvation_s: float) -> None:
        assert starvation_s > 0
        self._starvation_s = starvation_s
        self._heap: list[_Entry[T]] = []
        self._fifo: deque[_Entry[T]] = deque()
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, item: T, *, priority: int, deadline: float | None, now: float) -> _Entry[T]:
        """Add `item`; the returned entry can be passed to `remove()`."""
        key = (priority, math.inf if deadline is None else deadline, next(self._seq))
        entry = _Entry(key=key, arrival=now, item=item)
        heapq.heappush(self._heap, entry)
        self._fifo.append(entry)
        self._size += 1
        return entry

    def remove(self, entry: _Entry[T]) -> bool:
        """Drop an entry still in the queue (e.g. its caller was cancelled). False if already gone."""
        if entry.removed:
            return False
        entry.removed = True
        self._size -= 1
        return True

    def pop(self, now: float) -> T:
        """The next item to serve. Raises IndexError when empty."""
        if self._size == 0:
            raise IndexError("pop from an empty EdfQueue")
        self._drop_removed_heads()
        oldest = self._fifo[0]
        entry = oldest if now - oldest.arrival > self._starvation_s else self._heap[0]
        self.remove(entry)
        self._drop_removed_heads()
        return entry.item

    def _drop_removed_heads(self) -> None:
        while self._heap and self._heap[0].removed:
            heapq.heappop(self._heap)
        while self._fifo and self._fifo[0].removed:
            self._fifo.popleft()
