"""Host-side waits on the device's streams, shared by the engine and the KV transports.

`mark_current` records where the calling thread's stream is now, so work elsewhere (another
stream, another thread) can be ordered after it without a host wait. `to_host` reads a small
device tensor back, waiting with the GIL released: `.tolist()` alone holds the GIL for as long
as the device takes to get there, a whole step, and every other thread of the process (a KV
sender posting a streamed prefill's messages, gRPC servers, an actor's event loop) would stand
still meanwhile.
"""

from __future__ import annotations

import torch


def mark_current(device: torch.device) -> torch.cuda.Event | None:
    """An event at the end of the calling thread's current stream on `device` (None on CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def wait_current(device: torch.device) -> None:
    """Wait, without the GIL, until the calling thread's stream on `device` gets here."""
    done = mark_current(device)
    if done is not None:
        done.synchronize()


def to_host(t: torch.Tensor) -> list:
    """`t.tolist()`, waiting for the device first without the GIL (`Event.synchronize`)."""
    wait_current(t.device)
    return t.tolist()
