"""ThreadedReceiver: the transport-independent half of every KVReceiver.

Each transfer is a `Transfer` job run on a worker thread: for every head slice of the reshard
plan it asks the transport to fetch blocks from one source rank (`_fetch_slice`), writing each
chunk through `Transfer.write`, then acks every source rank it read from (or sends them a
failure notice).

State machine (`TransferState`), advanced only under the job's lock:

    WAITING --first write--> TRANSFERRING --worker ok--> DONE
    WAITING | TRANSFERRING --worker error | timeout | cancel--> ABORTING --writes stopped--> FAILED

ABORTING is reported as TRANSFERRING (or WAITING if nothing landed): the destination blocks
are still being written. FAILED is reported only after the job's gate closed, i.e. no write can
land any more, and `on_release(transfer_id, dst_block_ids)` runs exactly once at that moment.

Device ordering (CUDA): `start` records `engine_ready` on the caller's (the engine's) stream; a
transport that writes on its own stream waits for it first, and lets a write finish on the
device before it leaves the gate (`write_layers`' `settle`), so DONE and FAILED both mean no
write to the destination blocks is still running.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.device_sync import mark_current
from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import InvalidBlockIdsError, TransferAbortedError
from kvtransfer.gate import AccessGate
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll, KVReceiver, ReleaseCallback
from kvtransfer.reshard import HeadSlice, plan_for_destination
from kvtransfer.sender import view_layout

log = logging.getLogger(__name__)
_MAX_FINISHED = 4096


class TransferState(enum.Enum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    ABORTING = "aborting"
    DONE = "done"
    FAILED = "failed"


@dataclass
class Transfer:
    handle: KVHandle
    dst_block_ids: list[int]
    plan: list[HeadSlice]
    deadline: float
    view: KVCacheView
    state: TransferState = TransferState.WAITING
    reason: str | None = None
    worker_result: tuple[bool, str] | None = None
    wrote: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    gate: AccessGate = field(default_factory=AccessGate)
    cancelled: threading.Event = field(default_factory=threading.Event)
    abort_hooks: list[Callable[[], None]] = field(default_factory=list)
    engine_ready: torch.cuda.Event | None = None  # the engine's stream at start() (CUDA)
    stamps: dict[str, float] = field(default_factory=dict)  # transport stages (perf_counter)

    @property
    def transfer_id(self) -> str:
        return self.handle.transfer_id

    def write(self, first: int, blocks: torch.Tensor, part: HeadSlice) -> None:
        """Writes `blocks` [n, L, 2, bs, h, D] at handle block index `first` (any thread)."""
        dst = self.dst_block_ids[first : first + blocks.shape[0]]
        with self._writing():
            self.view.write_blocks(
                dst, blocks.permute(1, 2, 0, 3, 4, 5), (part.dst_start, part.dst_end)
            )

    def write_layers(
        self,
        layers: tuple[int, int],
        data: torch.Tensor,
        part: HeadSlice,
        index: torch.Tensor,
        settle: Callable[[], None],
    ) -> None:
        """Writes layer-major `data` [l, 2, n, bs, h, D] (every block of the handle) into the
        destination blocks' layers `layers` (any thread). `index` is the view's `block_index`
        of the destination blocks; `settle()` returns once the write ran on the device (it
        runs inside the gate: a release never frees blocks that a copy is still writing)."""
        with self._writing():
            self.view.write_indexed(index, data, (part.dst_start, part.dst_end), layers)
            settle()

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """One write into the destination blocks; refused once cancelled or released."""
        if self.cancelled.is_set():
            raise TransferAbortedError("transfer cancelled")
        with self.gate.access():
            yield
            self.wrote = True

    def stamp(self, stage: str) -> None:
        self.stamps[stage] = time.perf_counter()

    def on_abort(self, hook: Callable[[], None]) -> None:
        """Registers a hook that unblocks the transport (e.g. cancels an RPC) on abort."""
        self.abort_hooks.append(hook)
        if self.cancelled.is_set():
            hook()


class ThreadedReceiver(KVReceiver):
    def __init__(
        self,
        view: KVCacheView,
        *,
        on_release: ReleaseCallback,
        timeout_s: float = 30.0,
        max_concurrent: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self._on_release = on_release
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, Transfer] = {}
        self._finished: OrderedDict[str, Transfer] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_concurrent, thread_name_prefix=type(self).__name__)

    # --- transport hooks --------------------------------------------------------------------
    def _fetch_slice(self, job: Transfer, part: HeadSlice) -> None:
        """Pulls `part` of every block from source rank `part.source_rank`; raises on failure."""
        raise NotImplementedError

    def _notify(self, handle: KVHandle, source_rank: int, ok: bool, reason: str) -> None:
        """Sends an ack (ok) or failure notice to one source rank; must not raise for a dead peer."""
        raise NotImplementedError

    # --- KVReceiver ---------------------------------------------------------------------------
    def start(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> None:
        handle.layout.check_compatible(view_layout(self.view))
        if len(dst_block_ids) != handle.num_blocks:
            raise InvalidBlockIdsError(
                "dst_block_ids", f"{len(dst_block_ids)} ids for {handle.num_blocks} blocks"
            )
        self.view.check_block_ids(dst_block_ids, "dst_block_ids")
        plan = plan_for_destination(
            self.view.tp.tp_rank,
            self.view.tp.tp_size,
            handle.layout.tp_size,
            handle.layout.num_kv_heads,
        )
        job = Transfer(
            handle,
            list(dst_block_ids),
            plan,
            self._clock() + self._timeout_s,
            self.view,
            engine_ready=mark_current(self.view.device),
        )
        with self._lock:
            if handle.transfer_id in self._active or handle.transfer_id in self._finished:
                raise ValueError(f"transfer_id: {handle.transfer_id!r} already started")
            self._active[handle.transfer_id] = job
        self._pool.submit(self._run, job)

    def poll(self, transfer_id: str) -> KVPoll:
        try:
            self._advance_all()
            with self._lock:
                job = self._active.get(transfer_id) or self._finished.get(transfer_id)
            return _public_state(job) if job is not None else KVPoll.FAILED
        except Exception:  # noqa: BLE001 - the contract: poll never raises
            log.exception("kvtransfer: poll(%s) failed internally", transfer_id)
            return KVPoll.FAILED

    def failure_reason(self, transfer_id: str) -> str | None:
        with self._lock:
            job = self._active.get(transfer_id) or self._finished.get(transfer_id)
        if job is None:
            return f"unknown transfer id {transfer_id!r}"
        return job.reason if job.state is TransferState.FAILED else None

    def stamps(self, transfer_id: str) -> dict[str, float]:
        """The transport's stage times of a transfer (time.perf_counter; for benchmarks)."""
        with self._lock:
            job = self._active.get(transfer_id) or self._finished.get(transfer_id)
        return dict(job.stamps) if job is not None else {}

    def cancel(self, transfer_id: str) -> None:
        with self._lock:
            job = self._active.get(transfer_id)
        if job is not None:
            self._abort(job, "cancelled")
            self._advance(job)

    def close(self) -> None:
        with self._lock:
            jobs = list(self._active.values())
        for job in jobs:
            self._abort(job, "receiver closed")
        self._pool.shutdown(wait=True)
        self._advance_all()

    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    # --- internals ----------------------------------------------------------------------------
    def _run(self, job: Transfer) -> None:
        ok, reason = True, ""
        sources = sorted({p.source_rank for p in job.plan})
        try:
            if job.cancelled.is_set():
                raise TransferAbortedError("cancelled before start")
            for part in job.plan:
                self._fetch_slice(job, part)
        except Exception as exc:  # noqa: BLE001 - any transport error fails this transfer only
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        with job.lock:
            if ok and job.cancelled.is_set():
                ok, reason = False, job.reason or "cancelled"
            job.worker_result = (ok, reason)
        for rank in sources:
            try:
                self._notify(job.handle, rank, ok, reason)
            except Exception:  # noqa: BLE001 - the sender's lease expires anyway
                log.warning(
                    "kvtransfer: notice to source rank %d of %s failed", rank, job.transfer_id
                )

    def _abort(self, job: Transfer, reason: str) -> None:
        with job.lock:
            if (
                job.state not in (TransferState.WAITING, TransferState.TRANSFERRING)
                or job.worker_result
            ):
                return
            job.state, job.reason = TransferState.ABORTING, reason
            job.cancelled.set()
        for hook in list(job.abort_hooks):
            hook()

    def _advance_all(self) -> None:
        with self._lock:
            jobs = list(self._active.values())
        for job in jobs:
            self._advance(job)

    def _advance(self, job: Transfer) -> None:
        if self._clock() >= job.deadline:
            self._abort(job, f"timed out after {self._timeout_s}s")
        release = False
        with job.lock:
            if job.state is TransferState.WAITING and job.wrote:
                job.state = TransferState.TRANSFERRING
            if job.worker_result is not None and job.state is not TransferState.ABORTING:
                ok, reason = job.worker_result
                if not ok and self._clock() >= job.deadline:  # the transport hit our deadline first
                    reason = f"timed out after {self._timeout_s}s ({reason})"
                job.state, job.reason = (
                    (TransferState.DONE, None) if ok else (TransferState.ABORTING, reason)
                )
            if job.state is TransferState.ABORTING and job.gate.try_close():
                job.state, release = TransferState.FAILED, True
            terminal = job.state in (TransferState.DONE, TransferState.FAILED)
        if terminal:
            self._retire(job)
        if release:
            self._on_release(job.transfer_id, job.dst_block_ids)

    def _retire(self, job: Transfer) -> None:
        with self._lock:
            if self._active.pop(job.transfer_id, None) is None:
                return
            self._finished[job.transfer_id] = job
            while len(self._finished) > _MAX_FINISHED:
                self._finished.popitem(last=False)


def _public_state(job: Transfer) -> KVPoll:
    if job.state is TransferState.ABORTING:
        return KVPoll.TRANSFERRING if job.wrote else KVPoll.WAITING
    return KVPoll(job.state.value)
