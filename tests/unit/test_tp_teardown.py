"""TP teardown on failure paths is bounded: an NCCL abort or destroy that blocks for good (seen
after a peer died on 2 x H200) must not keep the caller from raising its TPGroupError."""

from __future__ import annotations

import threading
import time

from engine.distributed.process_group import _bounded


def test_a_teardown_that_never_returns_is_left_behind_within_the_bound():
    release = threading.Event()
    start = time.monotonic()
    assert _bounded(release.wait, "destroying a stuck group", wait_s=0.2) is False
    assert time.monotonic() - start < 1.0
    release.set()


def test_a_teardown_that_fails_is_logged_not_raised(caplog):
    def boom() -> None:
        raise RuntimeError("communicator already aborted")

    assert _bounded(boom, "aborting the group", wait_s=1.0) is True
    assert "communicator already aborted" in caplog.text
