"""Request ordering for the scheduler: pure functions, no engine state, no torch.

Order (first served first): priority (lower value first), then deadline (earlier first; no
deadline sorts after every deadline), then arrival time. Starvation guard: a request older
than `starvation_timeout_s` (now - arrival_time) sorts before every younger one, oldest first,
whatever its priority or deadline; so a stream of high-priority work delays, but never
starves, low-priority work.

The same order decides whom to preempt: the last request in policy order goes first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol, TypeVar


class Orderable(Protocol):
    """What the policy reads from a request."""

    @property
    def priority(self) -> int: ...

    @property
    def deadline(self) -> float | None: ...

    @property
    def arrival_time(self) -> float: ...


R = TypeVar("R", bound=Orderable)

PolicyKey = tuple[int, float, float, float]


def is_starved(request: Orderable, now: float, starvation_timeout_s: float) -> bool:
    return now - request.arrival_time > starvation_timeout_s


def policy_key(request: Orderable, now: float, starvation_timeout_s: float) -> PolicyKey:
    """Sort key: smaller is served first."""
    if is_starved(request, now, starvation_timeout_s):
        return (0, 0.0, 0.0, request.arrival_time)
    deadline = math.inf if request.deadline is None else request.deadline
    return (1, float(request.priority), deadline, request.arrival_time)


def sort_by_policy(requests: Iterable[R], now: float, starvation_timeout_s: float) -> list[R]:
    """A new list in service order. Stable: ties keep their input order. O(n log n)."""
    return sorted(requests, key=lambda r: policy_key(r, now, starvation_timeout_s))
