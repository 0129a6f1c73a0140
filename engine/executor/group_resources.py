"""GroupResources: what a TP group holds beyond rank 0's Python objects, and its release.

Held: the follower actors (processes, with their host and device memory), the placement group
when the group made it, the watchdog thread, the step channel's shared-memory mapping, and this
process's torch.distributed groups. The default group is process-global: the next TP group in
this process can start only once it is destroyed.

`release()` gives all of it back, once (idempotent, thread-safe). TPExecutor.shutdown() runs
it, its failure path runs it, and so does the executor's finalizer when an executor is
garbage-collected without a shutdown (weakref.finalize: this object never refers to the
executor, so no reference cycle keeps either alive, and nothing is left to atexit).

Order of a graceful release: SHUTDOWN through the channel (each follower's loop returns and
destroys its process group), rank 0 destroys its own while its peers still live, then the
actors are killed and their processes waited for (`exit_wait_s`: their memory, device memory
included, is free only once they exited). After a failure, or when the loops do not stop in
time, the actors are killed first (a dead or hung peer never answers) and rank 0's group is
destroyed after, bounded (process_group._bounded). A failure waits neither for the processes
to exit nor for the watchdog thread to end (its error must surface within its bound); a later
shutdown does (`wait_stopped`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from engine.distributed.process_group import destroy_tp_group
from engine.executor import ray_launch
from engine.executor.step_channel import StepChannel
from engine.executor.watchdog import FollowerWatchdog

log = logging.getLogger(__name__)

WATCHDOG_EXIT_WAIT_S = 10.0  # its poll interval, plus one Ray call it may be in
EXIT_WAIT_S = 30.0  # killed followers' processes exit well within this


class GroupResources:
    def __init__(
        self,
        pg: Any,
        watchdog: FollowerWatchdog,
        stop_timeout_s: float,
        exit_wait_s: float = EXIT_WAIT_S,
    ) -> None:
        """`pg`: the placement group to remove, None when it is not the group's own.
        `stop_timeout_s`: how long the followers' loops get to return after SHUTDOWN."""
        self.followers: list[Any] = []  # followers[i] is rank i + 1
        self.follower_pids: list[int] = []
        self.follower_node_ids: list[str] = []
        self.pg = pg
        self.watchdog = watchdog
        self.channel: StepChannel | None = None
        self.run_futures: dict[int, Any] = {}  # rank -> its run_loop ObjectRef
        self.stop_timeout_s = stop_timeout_s
        self.exit_wait_s = exit_wait_s
        self._lock = threading.Lock()
        self._released = False

    def release(self, graceful: bool) -> None:
        """Give everything back (see the module docstring); later calls do nothing. Never
        raises: it runs on failure paths, from finalizers and at interpreter exit."""
        with self._lock:
            if self._released:
                return
            self._released = True
        stopped = graceful and self._stop_loops()
        self.watchdog.stop()
        if stopped:
            destroy_tp_group()
        ray_launch.kill_actors(self.followers, self.pg)
        self.pg = None
        if graceful:
            self.wait_stopped()
        if self.channel is not None:
            self.channel.close()
        destroy_tp_group()

    def _stop_loops(self) -> bool:
        """SHUTDOWN to every follower; True once every loop returned within stop_timeout_s."""
        import ray

        if self.channel is None or not self.run_futures or not ray.is_initialized():
            return False  # not running yet, or Ray is down (it took the actors with it)
        self.watchdog.watch({}, may_return=True)  # a loop returning now is no failure
        try:
            self.channel.publish_shutdown()
            ray.get(list(self.run_futures.values()), timeout=self.stop_timeout_s)
        except Exception as err:  # noqa: BLE001 - any failure here means: kill them
            log.warning(
                "TP followers did not stop on SHUTDOWN (%s); killing them", _first_line(err)
            )
            return False
        return True

    def wait_stopped(self) -> None:
        """After release: wait (bounded) for the watchdog thread to end and for the killed
        followers' processes on this node to exit."""
        self.watchdog.stop(WATCHDOG_EXIT_WAIT_S)
        here = ray_launch.this_node_id()
        pids = [
            pid for pid, node in zip(self.follower_pids, self.follower_node_ids) if node == here
        ]
        running = ray_launch.wait_exited(pids, self.exit_wait_s)
        if running:
            log.warning(
                "TP follower processes %s still run %.0f s after they were killed",
                running,
                self.exit_wait_s,
            )


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return (lines[0][:300] if lines else "") or type(err).__name__
