"""A worker's watch on its router: when the router's calls stop, its requests are orphans.

The router calls every worker's `load()` each heartbeat (0.5 s) and long-polls the output
workers' `next_outputs()`; each such call is `heard()`. When none has come for `timeout_s`, the
router is taken for lost (its process died, or it cannot reach this worker): `check()`, run on
the engine thread before every step, aborts every request and held KV transfer it sent here
through the worker's own abort path, logs one warning, and the worker serves on. A new
router's first call starts the clock again; a worker that never heard a router aborts nothing.

Hazard: the watch cannot tell a dead router from a partitioned one. A router that comes back
after `timeout_s` finds its requests gone (it sees them end as aborts or unknown); keep
`timeout_s` well above the heartbeat interval and the router's own worker-loss timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
DEFAULT_ROUTER_TIMEOUT_S = 10.0


class RouterWatch:
    """`abort_all()` (engine thread) aborts every request and held transfer and returns how
    many; `num_free_blocks()` (engine thread) reads the KV pool, for the warning's figures."""

    def __init__(
        self,
        timeout_s: float,
        abort_all: Callable[[], int],
        num_free_blocks: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"router_timeout_s: must be > 0, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self._abort_all = abort_all
        self._num_free_blocks = num_free_blocks
        self._clock = clock
        self._last_heard: float | None = None  # None: no router since start or the last loss
        self.num_losses = 0

    def heard(self) -> None:
        """Any thread: the router called. Cheap (one float store, atomic under the GIL)."""
        self._last_heard = self._clock()

    def is_lost(self) -> bool:
        """True when a router was heard and then nothing for `timeout_s`."""
        last = self._last_heard
        return last is not None and self._clock() - last > self.timeout_s

    def check(self) -> int:
        """Engine thread, every loop iteration: on a lost router, abort everything it sent and
        return how many requests and transfers went (0 otherwise). Fires once per loss."""
        if not self.is_lost():
            return 0
        self._last_heard = None
        self.num_losses += 1
        free_before = self._num_free_blocks()
        num_aborted = self._abort_all()
        freed = self._num_free_blocks() - free_before
        log.warning(
            "router lost (no call for %gs): aborted %d orphaned requests/transfers, "
            "freed %d KV blocks now (transfers still draining free theirs later)",
            self.timeout_s,
            num_aborted,
            freed,
        )
        return num_aborted
