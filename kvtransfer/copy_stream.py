"""How a transport's threads wait for device work.

`poll_until`: every wait of a transport thread on device work is a poll with a deadline, never a
blocking synchronize (a peer that never posts must not hold a thread past its deadline). The
interval grows with the time waited, so a short wait ends within microseconds of the work and a
long one costs at most ~1,000 wake-ups per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

_MAX_POLL_S = 0.001
_POLL_FRACTION = 8  # poll every 1/8 of the time waited so far: a wait ends at most ~12% late


def poll_until(done: Callable[[], bool], deadline: float = math.inf,
               give_up: Callable[[], bool] = lambda: False) -> bool:
    """Polls `done` until it holds (True), or until `give_up()` or `deadline`
    (time.monotonic) comes first (False). Releases the GIL between polls."""
    start = time.monotonic()
    while not done():
        now = time.monotonic()
        if now >= deadline or give_up():
            return False
        time.sleep(min(_MAX_POLL_S, (now - start) / _POLL_FRACTION, deadline - now))
    return True
