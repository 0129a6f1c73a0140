"""The worker registry: who serves, their last load, and heartbeats that notice the dead.

Each worker is polled with `load()` every `heartbeat_interval_s`; a call that raises, takes
longer than `heartbeat_timeout_s` or reports `healthy=False` marks the worker UNHEALTHY (and
any component that found a worker broken may call `mark_unhealthy`). A later good heartbeat
makes it HEALTHY again. Listeners hear every HEALTHY -> UNHEALTHY transition (the decode
demultiplexers fail their streams) and every change of `serving`: True while at least one
healthy prefill and one healthy decode worker, or one healthy colocated worker, exist.

Each entry also carries the router's own bookkeeping since the worker's last snapshot (prompt
tokens in flight, decode requests and KV blocks placed): the snapshot lags, the router does not.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from router.policy import WorkerView
from router.prefix_index import PrefixIndex
from router.tasks import cancel_and_wait, fail_loudly
from router.worker_api import CostModel, LoadSnapshot

log = logging.getLogger(__name__)


class Pool(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class WorkerState(enum.Enum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


@dataclass(eq=False)
class WorkerEntry:
    """Mutable, owned by the registry's event loop. `down` resolves when the worker goes unhealthy."""

    worker_id: str
    pool: Pool
    handle: Any
    metrics_target: str | None
    load: LoadSnapshot = LoadSnapshot(healthy=False)
    cost: CostModel = CostModel()
    state: WorkerState = WorkerState.UNHEALTHY
    last_ok: float = 0.0
    pending_prefill_tokens: int = 0
    started_since_snapshot: int = 0
    reserved_blocks: int = 0
    prefix: PrefixIndex = field(default_factory=PrefixIndex)
    down: asyncio.Future[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.state is WorkerState.HEALTHY

    def view(self) -> WorkerView:
        return WorkerView(
            self.worker_id,
            self.load,
            self.cost,
            self.pending_prefill_tokens,
            self.started_since_snapshot,
            self.reserved_blocks,
        )


class WorkerRegistry:
    def __init__(self, heartbeat_interval_s: float = 0.5, heartbeat_timeout_s: float = 1.0) -> None:
        assert heartbeat_interval_s > 0 and heartbeat_timeout_s > 0
        self._interval = heartbeat_interval_s
        self._timeout = heartbeat_timeout_s
        self._entries: dict[str, WorkerEntry] = {}
        self._down_listeners: list[Callable[[str], None]] = []
        self._serving_listeners: list[Callable[[bool], None]] = []
        self._serving = False
        self._task: asyncio.Task[None] | None = None

    # -- membership -------------------------------------------------------------------------
    async def add(self, worker_id: str, pool: Pool, handle: Any, metrics_target: str | None = None) -> WorkerEntry:
        """Register a worker and heartbeat it once (it starts HEALTHY only if that succeeds)."""
        if worker_id in self._entries:
            raise ValueError(f"worker {worker_id!r} is already registered")
        entry = WorkerEntry(worker_id, Pool(pool), handle, metrics_target)
        self._entries[worker_id] = entry
        await self._beat(entry)
        return entry

    def remove(self, worker_id: str) -> None:
        entry = self._entries.pop(worker_id)
        self._set_unhealthy(entry, "removed")

    def entries(self) -> list[WorkerEntry]:
        return list(self._entries.values())

    def get(self, worker_id: str) -> WorkerEntry:
        return self._entries[worker_id]

    def healthy(self, pool: Pool) -> list[WorkerEntry]:
        return [e for e in self._entries.values() if e.pool is pool and e.healthy]

    @property
    def serving(self) -> bool:
        return self._serving

    def on_worker_down(self, callback: Callable[[str], None]) -> None:
        self._down_listeners.append(callback)

    def on_serving_change(self, callback: Callable[[bool], None]) -> None:
        self._serving_listeners.append(callback)

    # -- health -------------------------------------------------------------------------------
    def mark_unhealthy(self, worker_id: str, reason: str) -> None:
        entry = self._entries.get(worker_id)
        if entry is not None:
            self._set_unhealthy(entry, reason)

    def _set_unhealthy(self, entry: WorkerEntry, reason: str) -> None:
        if entry.state is WorkerState.UNHEALTHY:
            return
        log.warning("worker %s (%s) unhealthy: %s", entry.worker_id, entry.pool.value, reason)
        entry.state = WorkerState.UNHEALTHY
        if entry.down is not None and not entry.down.done():
            entry.down.set_result(None)
        for callback in self._down_listeners:
            callback(entry.worker_id)
        self._update_serving()

    def _set_healthy(self, entry: WorkerEntry) -> None:
        if entry.state is WorkerState.HEALTHY:
            return
        entry.state = WorkerState.HEALTHY
        entry.down = asyncio.get_running_loop().create_future()
        self._update_serving()

    def _update_serving(self) -> None:
        disagg = bool(self.healthy(Pool.PREFILL)) and bool(self.healthy(Pool.DECODE))
        serving = disagg or bool(self.healthy(Pool.COLOCATED))
        if serving != self._serving:
            self._serving = serving
            for callback in self._serving_listeners:
                callback(serving)

    # -- heartbeats ---------------------------------------------------------------------------
    async def _beat(self, entry: WorkerEntry) -> None:
        try:
            load = await asyncio.wait_for(entry.handle.load(), self._timeout)
            if not entry.healthy:  # (re)joining: its costs may have been recalibrated
                entry.cost = await asyncio.wait_for(entry.handle.cost_model(), self._timeout)
        except asyncio.TimeoutError:
            self._set_unhealthy(entry, f"no heartbeat within {self._timeout:.1f} s")
            return
        except Exception as exc:  # any failure of the call means we cannot use the worker
            self._set_unhealthy(entry, f"heartbeat failed: {exc!r}")
            return
        entry.load = load
        entry.started_since_snapshot = 0
        entry.reserved_blocks = 0
        entry.last_ok = time.monotonic()
        if load.healthy:
            self._set_healthy(entry)
        else:
            self._set_unhealthy(entry, "the worker reports itself unhealthy")

    async def heartbeat_once(self) -> None:
        entries = list(self._entries.values())
        await asyncio.gather(*(self._beat(e) for e in entries))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.heartbeat_once()

    def start(self) -> None:
        assert self._task is None, "already started"
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-heartbeat")
        self._task.add_done_callback(fail_loudly)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
