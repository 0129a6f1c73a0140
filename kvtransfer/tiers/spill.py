"""SpillQueue: device -> CPU-tier copies of evicted HBM blocks, off the engine's critical path.

Life cycle of one spill (the TieredStore drives it under its lock):
  1. the store gathers the evicted blocks into a staging tensor on the engine's current stream
     (`KVCacheView.read_rows`, HBM speed). Every later kernel on that stream is ordered after
     the gather, so the engine may reuse the blocks at once;
  2. `enqueue` records an event after the gather and, on a side stream that waits for it,
     copies the staging rows into reserved pinned slots (non_blocking), then records `done`;
  3. `pop_finished` hands back the spills whose copy finished (FIFO); the store then publishes
     their slots in the CPU tier's index. Nothing waits on the host unless asked (`wait`).
On CPU the staging tensor is already the snapshot; its copy into the slab runs at pop time.

Hazards:
- The slots' previous contents may still be read by a device copy (a fetch) enqueued earlier on
  the engine's stream: the side stream's wait on the event recorded there orders the overwrite
  after it.
- The staging tensor lives until its copy finished (the queue holds it): staging memory is
  bounded by the caller (`num_bytes`), which waits for older spills when over its budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from kvtransfer.tiers.cpu import CpuTier


@dataclass
class InFlightSpill:
    keys: list[Hashable]
    slots: list[int]
    staging: torch.Tensor  # rows [n, bytes_per_block]
    done: torch.cuda.Event | None  # None: copied into the slab when popped (CPU)


class SpillQueue:
    def __init__(self, cpu: CpuTier) -> None:
        self.cpu = cpu
        self._inflight: deque[InFlightSpill] = deque()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.num_bytes = 0  # staging bytes not yet copied out

    def __len__(self) -> int:
        return len(self._inflight)

    def enqueue(self, keys: Sequence[Hashable], slots: Sequence[int], staging: torch.Tensor) -> None:
        """Starts copying `staging` rows into the reserved `slots` of `keys`."""
        done: torch.cuda.Event | None = None
        if staging.is_cuda:
            gathered = torch.cuda.Event()
            gathered.record(torch.cuda.current_stream(staging.device))
            stream = self._side_stream(staging.device)
            with torch.cuda.stream(stream):
                stream.wait_event(gathered)
                self.cpu.copy_into(slots, staging)
                done = torch.cuda.Event()
                done.record(stream)
        self._inflight.append(InFlightSpill(list(keys), list(slots), staging, done))
        self.num_bytes += staging.numel()

    def pop_finished(self, wait: bool = False) -> list[InFlightSpill]:
        """Spills whose copy has finished, oldest first (all of them with `wait`)."""
        finished: list[InFlightSpill] = []
        while self._inflight:
            head = self._inflight[0]
            if head.done is not None and not head.done.query():
                if not wait:
                    break
                head.done.synchronize()
            if head.done is None:
                self.cpu.copy_into(head.slots, head.staging)
            finished.append(self._inflight.popleft())
            self.num_bytes -= head.staging.numel()
        return finished

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]
