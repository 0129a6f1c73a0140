"""AccessGate: lets a closer wait until in-flight block reads or writes have stopped.

Freeing KV blocks while another thread still copies into or out of them corrupts whatever the
engine puts there next. Every copy that touches engine blocks on behalf of a transfer runs
inside `gate.access()`; the owner of the blocks calls `try_close()` and frees them only once it
returned True. After closing, `access()` refuses (raises `TransferAbortedError`), so no copy
can start later. `try_close` never blocks: callers retry on their next poll.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from kvtransfer.errors import TransferAbortedError


class AccessGate:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._closing = False

    @contextmanager
    def access(self) -> Iterator[None]:
        """Runs the body as one access; raises TransferAbortedError once closing began."""
        with self._lock:
            if self._closing:
                raise TransferAbortedError("blocks were released; access refused")
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1

    def try_close(self) -> bool:
        """Refuses new accesses; True once no access is in flight (then closed for good)."""
        with self._lock:
            self._closing = True
            return self._active == 0

    @property
    def closing(self) -> bool:
        with self._lock:
            return self._closing
