"""Where a transport's block copies run, and how its threads wait for device work.

`CopyStream`: on CUDA a dedicated stream per transport object, so gathers and scatters neither
queue behind the engine's forward passes nor hold them up; on CPU nothing (copies there are
synchronous). The engine's own stream is tied in by events recorded on the engine thread
(`engine.device_sync.mark_current`): a sender's gather waits for the step that wrote the KV (recorded at
`register`), a receiver's scatter for the engine work queued before `start` (whatever last
used the destination blocks). Nothing waits for engine steps queued later.

`poll_until`: every wait of a transport thread on device work is a poll with a deadline, never a
blocking synchronize (a peer that never posts must not hold a thread past its deadline). For
its first 2 ms a wait polls back to back, yielding the GIL in between (`sleep(0)`): a timed
sleep lasts at least a timer tick (~60 us on Linux), and a receiver waits twice per message of
a transfer (the receive, then its scatter), so ticks made the host loop, not the link, set the
pace (2 x H200: a 4k-token transfer's data phase 2.59 ms against 1.49 ms for one raw send).
After that the interval grows with the time waited, up to 0.25 ms: a long wait costs at most
~4,000 wake-ups per second, and ends at most 0.25 ms late. The cap matters for streamed
transfers, whose receiver waits through the whole prefill for the last message (2 x H200, 4k
tokens: with a 1 ms cap the KV landed 0.76 ms after the first token, median).

Hazard: a copy enqueued on the copy stream is still running when the call that enqueued it
returns. A caller that hands the blocks back (lease end, transfer failure) must first `settle()`
the stream, inside the blocks' access gate.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch

_MAX_POLL_S = 0.00025
_POLL_FRACTION = 8  # poll every 1/8 of the time waited so far: a wait ends at most ~12% late
_SPIN_S = 0.002  # poll back to back for this long first (device work about to finish)


def poll_until(
    done: Callable[[], bool],
    deadline: float = math.inf,
    give_up: Callable[[], bool] = lambda: False,
) -> bool:
    """Polls `done` until it holds (True), or until `give_up()` or `deadline`
    (time.monotonic) comes first (False). Releases the GIL between polls."""
    start = time.monotonic()
    while not done():
        now = time.monotonic()
        if now >= deadline or give_up():
            return False
        waited = now - start
        time.sleep(
            0.0 if waited < _SPIN_S else min(_MAX_POLL_S, waited / _POLL_FRACTION, deadline - now)
        )
    return True


class CopyStream:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Makes the copy stream the calling thread's current stream (no-op on CPU)."""
        if self.stream is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            yield

    def wait_for(self, event: torch.cuda.Event | None) -> None:
        """Later work on the copy stream starts after `event` (device-side: never blocks)."""
        if self.stream is not None and event is not None:
            self.stream.wait_event(event)

    def settle(self) -> None:
        """Returns once everything enqueued on the copy stream so far has run. Unbounded on
        purpose: that work waits only on this device (engine work queued before a mark, and
        receives that already completed), never on a peer."""
        if self.stream is None:
            return
        event = torch.cuda.Event()
        event.record(self.stream)
        poll_until(event.query)
