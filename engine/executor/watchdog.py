"""Rank 0's liveness watchdog over its followers: a daemon thread, never a Ray call per step.

Each follower has one pending future (its `start()`, then its `run_loop()`): an actor that dies
or raises resolves it with an error. Every `poll_s` the thread checks those futures without
blocking, and the age of the step in flight. On the first failure it records a `Failure` and
aborts the process groups, so a leader blocked in a collective (an NCCL kernel inside a CUDA
graph waits forever for a dead peer; gloo waits up to its timeout) returns and raises.

Hazard: the thread only records and aborts; the leader's own thread raises TPGroupError, so
the error always surfaces in the caller of `LLMEngine.step()`.
"""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

from engine.distributed.process_group import abort_groups
from engine.executor import shm_channel


class Failure(NamedTuple):
    rank: int | None
    message: str


class FollowerWatchdog:
    def __init__(self, step_timeout_s: float, poll_s: float = 0.2) -> None:
        self.step_timeout_s = step_timeout_s
        self.poll_s = poll_s
        self._lock = threading.Lock()
        self._futures: dict[int, Any] = {}
        self._may_return = False
        self._step_started: float | None = None
        self._failure: Failure | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tp-watchdog", daemon=True)
        self._thread.start()

    @property
    def failure(self) -> Failure | None:
        return self._failure

    def watch(self, futures: dict[int, Any], may_return: bool) -> None:
        """Replace the watched futures (rank -> ObjectRef). With `may_return` a future that
        resolves with a value is done (start-up); otherwise any resolution is a failure."""
        with self._lock:
            self._futures = dict(futures)
            self._may_return = may_return

    def step_started(self) -> None:
        self._step_started = time.monotonic()

    def step_finished(self) -> None:
        self._step_started = None

    def stop(self, wait_s: float = 0.0) -> None:
        """End the thread; wait up to `wait_s` for it to exit (never for itself)."""
        self._stop.set()
        if wait_s > 0 and threading.current_thread() is not self._thread:
            self._thread.join(wait_s)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s) and self._failure is None:
            failure = self.check(0.0) or self._overdue()
            if failure is not None:
                shm_channel.abort_all()  # step-channel waits return at once
                abort_groups()  # first: whoever sees the failure may tear the groups down at once
                self._failure = failure

    def _overdue(self) -> Failure | None:
        started = self._step_started
        if started is None or time.monotonic() - started < self.step_timeout_s:
            return None
        with self._lock:
            ranks = sorted(self._futures)
        rank = ranks[0] if len(ranks) == 1 else None
        return Failure(
            rank,
            f"did not finish a step within {self.step_timeout_s:.0f} s (hung); followers {ranks}",
        )

    def check(self, timeout_s: float) -> Failure | None:
        """The first follower whose future resolved badly within `timeout_s`, as a Failure."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                by_ref = {ref: rank for rank, ref in self._futures.items()}
                may_return = self._may_return
            if not by_ref:
                return None
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=left)
            if not ready:
                return None
            failure = self._outcome(by_ref[ready[0]], ready[0], may_return)
            if failure is not None:
                return failure

    def _outcome(self, rank: int, ref: Any, may_return: bool) -> Failure | None:
        import ray

        try:
            result = ray.get(ref, timeout=5)
        except ray.exceptions.RayActorError as err:
            return Failure(rank, f"died: {_first_line(err)}")
        except Exception as err:  # noqa: BLE001 - any follower exception fails the group
            return Failure(rank, f"failed: {type(err).__name__}: {_first_line(err)}")
        if not may_return:
            return Failure(rank, f"stopped unexpectedly (returned {result!r})")
        with self._lock:
            self._futures.pop(rank, None)
        return None


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__
