"""The worker registry: who serves, their last load, and heartbeats that notice the dead.

Each worker is polled with `load()` every `heartbeat_interval_s`; a call that raises, takes
longer than `heartbeat_timeout_s` or reports `healthy=False` marks the worker UNHEALTHY (and
any component that found a worker broken may call `mark_unhealthy`). A later good heartbeat
makes it HEALTHY again. Listeners hear every HEALTHY -> UNHEALTHY transition (the decode
demultiplexers fail their streams) and every change of `serving`: True while at least one
healthy prefill and one healthy decode worker, or one healthy colocated worker, exist.

Each entry also carries the router's own bookkeeping of what the worker's last snapshot cannot
show (prompt tokens in flight, decode requests and KV blocks placed): the snapshot lags, the
router does not. It changes in one place: `reserve(plan, ...)` books a placed request on its
workers (`policy.bookings`) and returns the `Reservation` that gives each part back exactly
once: the prompt tokens at the end of the prefill, the rest when the request ends.

The decode part is cleared earlier only by a snapshot that shows the request: one whose
heartbeat began after the flow reported the request started on that worker
(`Reservation.mark_started`). Hazard: a request placed on a decode worker is invisible there
while it waits in the router, queues at the prefill worker and prefills (seconds under load),
so snapshots taken meanwhile must not clear it; before this rule they did, and a burst was
admitted against a TPOT prediction that never saw it. Listeners of `on_room_freed` hear every
change that may free KV room as the router sees it: a released decode booking still counted,
and every decode or colocated worker's snapshot.

Restarts (Ray `max_restarts`): each worker process reports an `incarnation` token in its
snapshot. A heartbeat that shows a new one means everything placed on the old process is gone:
the worker goes UNHEALTHY first (its `down` resolves, so its in-flight requests fail
UNAVAILABLE, and the down listeners fail its streams), every booking on it is given back (a
Reservation released later gives back nothing twice), its prefix index is emptied, and only
then may the same heartbeat re-admit it. A restarting worker fails its heartbeats meanwhile,
and placement only ever sees HEALTHY entries.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
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
    `decode_bookings` are the decode bookings they count, `prefill_bookings` those still
    counting prompt tokens, `beats_begun` numbers the heartbeats asked for, so a snapshot clears
    only the bookings started before it was asked for. `incarnation`: the worker process's
    token from its last good snapshot (module docstring, Restarts).
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
    beats_begun: int = 0
    decode_bookings: set[_Held] = field(default_factory=set)
    prefill_bookings: set[_Held] = field(default_factory=set)
    incarnation: str | None = None
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
    prefill_held: bool = True
    decode_held: bool = True
    shown_by_beat: int | None = None  # the first heartbeat whose snapshot shows the request

    @property
    def has_decode(self) -> bool:
        return self.booking.num_decode_starts > 0 or self.booking.num_kv_blocks > 0

    def book(self) -> None:
        e, b = self.entry, self.booking
        e.pending_prefill_tokens += b.num_prefill_tokens
        e.prefill_bookings.add(self)
        if self.has_decode:
            e.started_since_snapshot += b.num_decode_starts
            e.reserved_blocks += b.num_kv_blocks
            e.decode_bookings.add(self)

    def mark_started(self) -> None:
        """The worker has the request: the next heartbeat asked for shows it."""
        if self.shown_by_beat is None:
            self.shown_by_beat = self.entry.beats_begun + 1

    def end_prefill(self) -> None:
        if self.prefill_held:
            self.prefill_held = False
            self.entry.pending_prefill_tokens -= self.booking.num_prefill_tokens
            self.entry.prefill_bookings.discard(self)

    def clear_decode(self) -> bool:
        """Stop counting the decode part (shown by a snapshot, or ended). False if cleared."""
        if not self.decode_held or not self.has_decode:
            return False
        self.decode_held = False
        e, b = self.entry, self.booking
        e.decode_bookings.discard(self)
        e.started_since_snapshot -= b.num_decode_starts
        e.reserved_blocks -= b.num_kv_blocks
        assert e.started_since_snapshot >= 0 and e.reserved_blocks >= 0
        return True

    def release(self) -> bool:
        """Give back what is still held; True when KV blocks the router counted came free."""
        self.end_prefill()
        return self.clear_decode() and self.booking.num_kv_blocks > 0


@final
class Reservation:
    """What one placed request booked on its workers (`WorkerRegistry.reserve`).

    `end_prefill()`: its prompt is prefilled (first token out) or abandoned; `mark_started()`:
    its decode (or colocated) worker accepted it, so that worker's next snapshot shows it;
    `release()`: the request ended, any way. All are idempotent; leaving the `with` block
    releases. Until `mark_started()`, no snapshot clears the decode part: call it only once
    the worker's call that takes the request returned.
    """

    def __init__(self, held: list[_Held], on_room_freed: Callable[[], None]) -> None:
        self._held = held
        self._on_room_freed = on_room_freed

    def end_prefill(self) -> None:
        for held in self._held:
            held.end_prefill()

    def mark_started(self) -> None:
        for held in self._held:
            if held.has_decode:
                held.mark_started()

    def release(self) -> None:
        freed = [held.release() for held in self._held]
        if any(freed):
            self._on_room_freed()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def reserve_on(
    entries: Mapping[str, WorkerEntry],
    plan: Placement,
    num_prompt_tokens: int,
    on_room_freed: Callable[[], None],
) -> Reservation:
    """Book `plan`'s load (`policy.bookings`) on `entries`; `WorkerRegistry.reserve` and the
    planner's simulator (tandem.plan) both book through this. Synchronous, no event loop."""
    held = [_Held(entries[b.worker_id], b) for b in bookings(plan, num_prompt_tokens)]
    for part in held:
        part.book()
    return Reservation(held, on_room_freed)


def clear_shown(entry: WorkerEntry, beat: int) -> None:
    """Stop counting the decode bookings that heartbeat `beat`'s snapshot shows (a snapshot
    asked for after the request started there). Synchronous; the simulator calls it too."""
    for held in list(entry.decode_bookings):
        if held.shown_by_beat is not None and held.shown_by_beat <= beat:
            held.clear_decode()


class WorkerRegistry:
    def __init__(self, heartbeat_interval_s: float = 0.5, heartbeat_timeout_s: float = 1.0) -> None:
        assert heartbeat_interval_s > 0 and heartbeat_timeout_s > 0
        self._interval = heartbeat_interval_s
        self._timeout = heartbeat_timeout_s
        self._entries: dict[str, WorkerEntry] = {}
        self._down_listeners: list[Callable[[str], None]] = []
        self._serving_listeners: list[Callable[[bool], None]] = []
        self._room_listeners: list[Callable[[], None]] = []
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
        return reserve_on(self._entries, plan, num_prompt_tokens, self._room_freed)

    @property
    def serving(self) -> bool:
        return self._serving

    def on_worker_down(self, callback: Callable[[str], None]) -> None:
        self._down_listeners.append(callback)

    def on_serving_change(self, callback: Callable[[bool], None]) -> None:
        self._serving_listeners.append(callback)

    def on_room_freed(self, callback: Callable[[], None]) -> None:
        """`callback()` after any change that may free KV room (module docstring)."""
        self._room_listeners.append(callback)

    def _room_freed(self) -> None:
        for callback in self._room_listeners:
            callback()

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
        entry.beats_begun += 1
        beat = entry.beats_begun
        try:
            load = await asyncio.wait_for(entry.handle.load(), self._timeout)
            self._note_incarnation(entry, load.incarnation)
            if not entry.healthy:  # (re)joining: its costs may have been recalibrated
                entry.cost = await asyncio.wait_for(entry.handle.cost_model(), self._timeout)
        except asyncio.TimeoutError:
            self._set_unhealthy(entry, f"no heartbeat within {self._timeout:.1f} s")
            return
        except Exception as exc:  # any failure of the call means we cannot use the worker
            self._set_unhealthy(entry, f"heartbeat failed: {exc!r}")
            return
        entry.load = load
        clear_shown(entry, beat)
        entry.last_ok = time.monotonic()
        if load.healthy:
            self._set_healthy(entry)
        else:
            self._set_unhealthy(entry, "the worker reports itself unhealthy")
        if entry.pool is not Pool.PREFILL:
            self._room_freed()

    def _note_incarnation(self, entry: WorkerEntry, incarnation: str | None) -> None:
        """Record the worker process's token; a changed one is a restart (module docstring):
        fail what was in flight on the old process, then give back all that was booked on it."""
        if incarnation is None or incarnation == entry.incarnation:
            return
        old, entry.incarnation = entry.incarnation, incarnation
        if old is None:  # the first snapshot that reports one
            return
        self._set_unhealthy(entry, f"restarted (incarnation {old} -> {incarnation})")
        for held in list(entry.prefill_bookings | entry.decode_bookings):
            held.release()
        assert entry.pending_prefill_tokens == 0 and entry.reserved_blocks == 0
        assert entry.started_since_snapshot == 0
        entry.prefix = PrefixIndex()
        self._room_freed()

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
