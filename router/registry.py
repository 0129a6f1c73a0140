"""The worker registry: who serves, their last load, and heartbeats that notice the dead.

Each worker is polled with `load()` every `heartbeat_interval_s`; a call that raises, takes
longer than `heartbeat_timeout_s` or reports `healthy=False` marks the worker UNHEALTHY (and
any component that found a worker broken may call `mark_unhealthy`). A later good heartbeat
makes it HEALTHY again. Listeners hear every HEALTHY -> UNHEALTHY transition (the decode
demultiplexers fail their streams) and every change of `serving`: True while at least one
healthy prefill and one healthy decode worker, or one healthy colocated worker, exist.

Each entry also carries the router's own bookkeeping since the worker's last snapshot (prompt
tokens in flight, decode requests and KV blocks placed): the snapshot lags, the router does not.
It changes in one place: `reserve(plan, ...)` books a placed request on its workers
(`policy.bookings`) and returns the `Reservation` that gives each part back exactly once: the
prompt tokens at the end of the prefill, the rest when the request ends. A new snapshot clears
the decode part (it shows those requests now), so a later release leaves it alone.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, final

from router.policy import Booking, Placement, WorkerView, bookings
from router.prefix_index import PrefixIndex
from router.tasks import cancel_and_wait, fail_loudly
from tandem.contract.worker_api import CostModel, LoadSnapshot

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
    """Mutable, owned by the registry's event loop. `down` resolves when the worker goes unhealthy.

    The three counters after `last_ok` are the router's bookings (see the module docstring);
    `snapshot_epoch` counts the snapshots taken, so a release knows whether one came since.
    """

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
    snapshot_epoch: int = 0
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


@dataclass(eq=False)
class _Held:
    """One booking on one worker, and which of its parts are still held."""

    entry: WorkerEntry
    booking: Booking
    epoch: int  # the entry's snapshot epoch when booked
    prefill_held: bool = True
    decode_held: bool = True

    def book(self) -> None:
        e, b = self.entry, self.booking
        e.pending_prefill_tokens += b.num_prefill_tokens
        e.started_since_snapshot += b.num_decode_starts
        e.reserved_blocks += b.num_kv_blocks

    def end_prefill(self) -> None:
        if self.prefill_held:
            self.prefill_held = False
            self.entry.pending_prefill_tokens -= self.booking.num_prefill_tokens

    def release(self) -> None:
        self.end_prefill()
        if not self.decode_held:
            return
        self.decode_held = False
        e, b = self.entry, self.booking
        if e.snapshot_epoch == self.epoch:  # else a snapshot since cleared it (it shows them)
            e.started_since_snapshot -= b.num_decode_starts
            e.reserved_blocks -= b.num_kv_blocks


@final
class Reservation:
    """What one placed request booked on its workers (`WorkerRegistry.reserve`).

    `end_prefill()`: its prompt is prefilled (first token out) or abandoned; `release()`: the
    request ended, any way. Both are idempotent; leaving the `with` block releases.
    """

    def __init__(self, held: list[_Held]) -> None:
        self._held = held

    def end_prefill(self) -> None:
        for held in self._held:
            held.end_prefill()

    def release(self) -> None:
        for held in self._held:
            held.release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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
    async def add(
        self, worker_id: str, pool: Pool, handle: Any, metrics_target: str | None = None
    ) -> WorkerEntry:
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

    def reserve(self, plan: Placement, num_prompt_tokens: int) -> Reservation:
        """Book `plan`'s load on its workers (`policy.bookings`) until the Reservation gives it
        back. The workers must be registered (the plan was made from this registry's views)."""
        held: list[_Held] = []
        for booking in bookings(plan, num_prompt_tokens):
            entry = self._entries[booking.worker_id]
            held.append(_Held(entry, booking, entry.snapshot_epoch))
            held[-1].book()
        return Reservation(held)

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
        entry.snapshot_epoch += 1  # the snapshot shows the requests started so far
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
