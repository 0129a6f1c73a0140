"""SpillQueue: device -> CPU-tier copies of evicted HBM blocks, off the engine's critical path.

Life cycle of one spill (the TieredStore drives it under its lock):
  1. the store gathers the evicted blocks into a staging tensor on the engine's current stream
     (`KVCacheView.read_rows`, HBM speed). Every later kernel on that stream is ordered after
     the gather, so the engine may reuse the blocks at once;
  2. `enqueue` records an event after the gather and hands the spill to the pump thread (held
     spills: at `release()`, which the engine's cache calls once the step is over), which
     copies the staging rows into the reserved pinned slots on a side stream (that waits for
     the event) in pieces of at most PIECE_BYTES, at most PIECES_QUEUED queued at a time;
  3. `pop_finished` hands back the spills whose copy finished (FIFO); the store then publishes
     their slots in the CPU tier's index. Nothing waits on the host unless asked (`wait`).
On CPU the staging tensor is already the snapshot; its copy into the slab runs at pop time.

Why pieces: copies in one direction share the GPU's copy engine in the order they were
queued. A 512 MiB spill queued at once (the blocks a 4k-token admission evicts) held the
step's own device -> host copy of its sampled tokens behind it for the ~10 ms the spill takes
over PCIe; with two pieces queued, that copy waits for two pieces at most (~0.6 ms; one
piece queued at a time left the link idle between pieces: offload at 82 to 86% of a plain
pinned copy on 2 x H200). Held until the
step is over, the pump also leaves the engine thread alone (the GIL) while it enqueues the step.

Hazards:
- The slots' previous contents may still be read by a device copy (a fetch) enqueued earlier on
  the engine's stream: the side stream's wait on the event recorded there orders the overwrite
  after it.
- The staging tensor lives until its copy finished (the queue holds it): staging memory is
  bounded by the caller (`num_bytes`), which waits for older spills when over its budget.
- The pump thread only issues copies into slots the store reserved and sets `finished`; the
  store's index is touched by the store alone, under its lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from kvtransfer.tiers.cpu import CpuTier, slot_runs

log = logging.getLogger(__name__)
PIECE_BYTES = 16 << 20  # ~0.3 ms of PCIe
PIECES_QUEUED = 2  # the next piece is queued while one copies: the link never waits for the host


@dataclass
class InFlightSpill:
    keys: list[Hashable]
    slots: list[int]
    staging: torch.Tensor  # rows [n, bytes_per_block]
    gathered: torch.cuda.Event | None  # None: copied into the slab when popped (CPU)
    finished: threading.Event = field(default_factory=threading.Event)
    failed: bool = False  # the copy raised: the slots hold garbage and must not be published


class SpillQueue:
    def __init__(self, cpu: CpuTier) -> None:
        self.cpu = cpu
        self._inflight: deque[InFlightSpill] = deque()
        self._pump: queue.Queue[InFlightSpill | None] = queue.Queue()
        self._held: list[InFlightSpill] = []  # enqueued, waiting for `release()`
        self._thread: threading.Thread | None = None
        self._stream: torch.cuda.Stream | None = None
        self.num_bytes = 0  # staging bytes not yet copied out

    def __len__(self) -> int:
        return len(self._inflight)

    def enqueue(
        self,
        keys: Sequence[Hashable],
        slots: Sequence[int],
        staging: torch.Tensor,
        held: bool = False,
    ) -> None:
        """Starts copying `staging` rows into the reserved `slots` of `keys` (`held`: at
        `release()`, e.g. once the engine step that evicted the blocks is over)."""
        gathered: torch.cuda.Event | None = None
        if staging.is_cuda:
            gathered = torch.cuda.Event()
            gathered.record(torch.cuda.current_stream(staging.device))
        spill = InFlightSpill(list(keys), list(slots), staging, gathered)
        self._inflight.append(spill)
        self.num_bytes += staging.numel()
        if gathered is not None:
            self._start_pump(staging.device)
            if held:
                self._held.append(spill)
            else:
                self._pump.put(spill)

    def release(self) -> None:
        """Held spills start copying out."""
        for spill in self._held:
            self._pump.put(spill)
        self._held.clear()

    def pop_finished(self, wait: bool = False) -> list[InFlightSpill]:
        """Spills whose copy has finished, oldest first (all of them with `wait`)."""
        if wait:
            self.release()
        finished: list[InFlightSpill] = []
        while self._inflight:
            head = self._inflight[0]
            if head.gathered is not None and not head.finished.is_set():
                if not wait:
                    break
                head.finished.wait()
            if head.gathered is None:
                self.cpu.copy_into(head.slots, head.staging)
            finished.append(self._inflight.popleft())
            self.num_bytes -= head.staging.numel()
        return finished

    def close(self) -> None:
        """Stops the pump once every queued spill is copied."""
        self.release()
        if self._thread is not None:
            self._pump.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _start_pump(self, device: torch.device) -> None:
        if self._thread is None:
            self._stream = torch.cuda.Stream(device)
            self._thread = threading.Thread(
                target=self._run_pump, args=(device,), daemon=True, name="kv-spill-pump"
            )
            self._thread.start()

    def _run_pump(self, device: torch.device) -> None:
        assert self._stream is not None
        torch.cuda.set_device(device)
        rows_per_piece = max(1, PIECE_BYTES // self.cpu.bytes_per_block)
        while (spill := self._pump.get()) is not None:
            try:
                assert spill.gathered is not None  # only device spills are pumped
                queued: deque[torch.cuda.Event] = deque()
                with torch.cuda.stream(self._stream):
                    self._stream.wait_event(spill.gathered)
                    for pos, first, n in slot_runs(spill.slots):
                        for off in range(0, n, rows_per_piece):
                            k = min(rows_per_piece, n - off)
                            self.cpu.slab[first + off : first + off + k].copy_(
                                spill.staging[pos + off : pos + off + k], non_blocking=True
                            )
                            queued.append(torch.cuda.Event())
                            queued[-1].record(self._stream)
                            if len(queued) > PIECES_QUEUED:  # without the GIL
                                queued.popleft().synchronize()
                    while queued:
                        queued.popleft().synchronize()
            except Exception:  # e.g. a device error: the store drops these keys, never serves them
                log.exception("KV tier spill of %d blocks failed", len(spill.keys))
                spill.failed = True
            finally:
                spill.finished.set()
