"""TieredStore: the CPU and NVMe tiers below the engine's HBM pool, keyed by block hash.

Keys: blake2b-128 of (spec version, model salt, the view's KVCacheSpec and head slice, block
hash). A different spec version, salt, KV dtype, scales or head slice is therefore a miss, never
a wrong hit.

* `store` offloads blocks from the engine cache into the CPU tier and waits; `spill` does the
  same in the background (tiers/spill.py): the blocks are gathered on the engine's stream, so
  they may be reused at once, and become hits once their device -> host copy finished
  (published at the next store call). CPU evictions spill to NVMe on a background thread
  through a bounded queue (full queue: the block is dropped and counted; a failing write is
  logged and counted; the caller never blocks or sees an error).
* `lookup_prefix` walks the hash chain and returns the longest cached prefix across tiers.
* `fetch` / `write` (or `load`, both) copy a prefix into engine blocks, enqueued on the caller's
  stream without a host wait; NVMe hits are promoted to the CPU tier.
* `swap_out` / `swap_in`: preemption by swapping, keyed by a request-scoped key (partial
  blocks have no hash); swapped slots are pinned until swapped in or released.

Threading: public methods may be called from any thread; one lock serializes tier state.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.kv.block_hash import BLOCK_HASH_SPEC_VERSION
from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import TierFullError
from kvtransfer.tiers.cpu import CpuTier
from kvtransfer.tiers.nvme import NvmeTier
from kvtransfer.tiers.placement import Tier, spill_target
from kvtransfer.tiers.spill import SpillQueue

log = logging.getLogger(__name__)


@dataclass
class TierStats:
    blocks: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    spill_dropped: int = 0
    failures: int = 0


@dataclass(frozen=True)
class SwapHandle:
    swap_id: str
    keys: tuple[bytes, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.keys)


@dataclass
class _Spill:
    pending: dict[bytes, torch.Tensor] = field(default_factory=dict)


class TieredStore:
    def __init__(
        self,
        view: KVCacheView,
        *,
        model_salt: str,
        cpu_bytes: int,
        nvme_dir: str | Path | None = None,
        nvme_bytes: int = 0,
        spec_version: int = BLOCK_HASH_SPEC_VERSION,
        spill_queue_size: int = 64,
        pin_memory: bool | None = None,
        max_staging_bytes: int = 1 << 30,
    ) -> None:
        """`max_staging_bytes`: device memory that background spills may hold in staging copies
        (beyond it, `spill` waits for older spills to finish)."""
        self.bytes_per_block = view.bytes_per_block()  # the view's KVCacheSpec, its heads
        # The whole spec (dtype, geometry, scales) and the head slice: another cache is a miss.
        self._prefix = f"{spec_version}|{model_salt}|{view.spec!r}|{view.tp}".encode()
        self.cpu = CpuTier(self.bytes_per_block, cpu_bytes, pin_memory)
        self.nvme = (
            NvmeTier(nvme_dir, self.bytes_per_block, nvme_bytes) if nvme_dir is not None else None
        )
        self._enabled = {Tier.CPU} | (
            {Tier.NVME} if self.nvme and self.nvme.lru.num_slots else set()
        )
        self._stats = {Tier.CPU: TierStats(), Tier.NVME: TierStats()}
        self._lock = threading.Lock()
        self._spill = _Spill()
        self._offloads = SpillQueue(self.cpu)
        self._max_staging_bytes = max_staging_bytes
        self._queue: queue.Queue[tuple[bytes, torch.Tensor] | None] = queue.Queue(spill_queue_size)
        self._thread = threading.Thread(target=self._spill_loop, daemon=True, name="kv-tier-spill")
        self._thread.start()

    def key(self, block_hash: bytes) -> bytes:
        return hashlib.blake2b(self._prefix + block_hash, digest_size=16).digest()

    # --- lookups and loads --------------------------------------------------------------------
    def lookup_prefix(self, block_hashes: Sequence[bytes]) -> list[tuple[Tier, bytes]]:
        """The longest prefix of `block_hashes` present in some tier, with the tier of each."""
        found: list[tuple[Tier, bytes]] = []
        with self._lock:
            self._publish_offloads()
            for h in block_hashes:
                tier = self._where(self.key(h))
                if tier is None:
                    break
                found.append((tier, h))
        return found

    def load(
        self, block_hashes: Sequence[bytes], dst_view: KVCacheView, dst_block_ids: Sequence[int]
    ) -> int:
        """Copies the cached prefix of `block_hashes` into `dst_block_ids`; returns its length."""
        assert len(dst_block_ids) >= len(block_hashes)
        rows = self.fetch(block_hashes, dst_view.device)
        if rows.shape[0]:
            dst_view.write_rows(dst_block_ids[: rows.shape[0]], rows)
        return int(rows.shape[0])

    def fetch(self, block_hashes: Sequence[bytes], device: torch.device) -> torch.Tensor:
        """The cached prefix of `block_hashes` as rows [n, bytes_per_block] on `device`.

        CPU-tier hits go straight from the pinned slab to the device in runs of adjacent slots
        (no pageable staging copy), enqueued on the current stream and not awaited (the CPU
        tier orders later writes of those slots after them); NVMe hits are read, promoted, then
        copied."""
        rows: list[torch.Tensor] = []
        with self._lock:
            self._publish_offloads()
            cpu_run: list[bytes] = []
            for h in block_hashes:
                key = self.key(h)
                if key in self.cpu:
                    self._stats[Tier.CPU].hits += 1
                    cpu_run.append(key)
                    continue
                if cpu_run:
                    rows.append(self.cpu.get(cpu_run, device=device))
                    cpu_run = []
                row = self._fetch(key)
                if row is None:
                    break
                rows.append(row.to(device))
            if cpu_run:
                rows.append(self.cpu.get(cpu_run, device=device))
        if not rows:
            return torch.empty((0, self.bytes_per_block), dtype=torch.uint8, device=device)
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def write(
        self, rows: torch.Tensor, dst_view: KVCacheView, dst_block_ids: Sequence[int]
    ) -> None:
        """Rows from `fetch` into `dst_block_ids` (one per row)."""
        dst_view.write_rows(dst_block_ids, rows)

    def store(
        self, block_hashes: Sequence[bytes], src_view: KVCacheView, block_ids: Sequence[int]
    ) -> int:
        """Offloads blocks to the CPU tier and waits until they are hits (already cached ones
        are only touched); returns the number of new blocks."""
        with self._lock:
            num_new = self._offload(block_hashes, src_view, block_ids)
            self._publish_offloads(wait=True)
        return num_new

    def spill(
        self,
        block_hashes: Sequence[bytes],
        src_view: KVCacheView,
        block_ids: Sequence[int],
        held: bool = False,
    ) -> int:
        """`store` without the wait: the blocks may be overwritten (by kernels on the current
        stream) as soon as this returns; they become hits once their copy finished. `held`:
        the copy out starts at `start_spills()` (or when something waits for it)."""
        with self._lock:
            return self._offload(block_hashes, src_view, block_ids, held)

    # --- swap for preemption ------------------------------------------------------------------
    def swap_out(self, view: KVCacheView, block_ids: Sequence[int]) -> SwapHandle:
        """Copies blocks (full or partial) to pinned CPU slots; raises TierFullError if no room."""
        swap_id = uuid.uuid4().hex
        keys = tuple(
            hashlib.blake2b(f"swap|{swap_id}|{i}".encode(), digest_size=16).digest()
            for i in range(len(block_ids))
        )
        rows = view.read_rows(block_ids)
        with self._lock:
            if len(self.cpu.lru.lru_keys()) + (self.cpu.num_slots - len(self.cpu.lru)) < len(keys):
                raise TierFullError(
                    f"swap_out of {len(keys)} blocks: not enough evictable CPU slots"
                )
            self._spill_down(self.cpu.put(keys, rows, pinned=True, keep_evicted=self._spills_down))  # type: ignore[arg-type]
        return SwapHandle(swap_id, keys)

    def swap_in(self, handle: SwapHandle, view: KVCacheView, dst_block_ids: Sequence[int]) -> None:
        """Copies a swapped request's blocks back and frees its CPU slots."""
        assert len(dst_block_ids) == handle.num_blocks
        with self._lock:
            rows = self.cpu.get(handle.keys, device=view.device)
        view.write_rows(dst_block_ids, rows)
        self.release_swap(handle)

    def release_swap(self, handle: SwapHandle) -> None:
        with self._lock:
            for k in handle.keys:
                self.cpu.remove(k)

    # --- stats and lifecycle ------------------------------------------------------------------
    def stats(self) -> dict[Tier, TierStats]:
        with self._lock:
            self._publish_offloads()
            self._stats[Tier.CPU].blocks = len(self.cpu.lru)
            self._stats[Tier.CPU].bytes = len(self.cpu.lru) * self.bytes_per_block
            nvme_blocks = len(self.nvme.lru) if self.nvme else 0
            self._stats[Tier.NVME].blocks = nvme_blocks
            self._stats[Tier.NVME].bytes = nvme_blocks * self.bytes_per_block
            if self.nvme:
                self._stats[Tier.NVME].failures = (
                    self.nvme.num_write_failures + self.nvme.num_corrupt
                )
            return {t: TierStats(**vars(s)) for t, s in self._stats.items()}

    def start_spills(self) -> None:
        """Spills queued with `spill(..., held=True)` start copying out."""
        with self._lock:
            self._offloads.release()

    def flush(self) -> None:
        """Waits until every background spill has landed in its tier (tests, shutdown)."""
        with self._lock:
            self._publish_offloads(wait=True)
        self._queue.join()

    def close(self) -> None:
        with self._lock:
            self._publish_offloads(wait=True)
        self._offloads.close()
        self._queue.put(None)
        self._thread.join(timeout=10)

    # --- internals (under self._lock) ---------------------------------------------------------
    def _offload(
        self,
        block_hashes: Sequence[bytes],
        view: KVCacheView,
        block_ids: Sequence[int],
        held: bool = False,
    ) -> int:
        """Starts the copies of blocks not in any tier yet into reserved CPU slots, in batches
        that fit the evictable slots and the staging budget (waiting for older copies when
        either is short). Raises TierFullError when every CPU slot is pinned."""
        self._publish_offloads()
        keys = [self.key(h) for h in block_hashes]
        new = list(
            {
                k: b
                for k, b in zip(keys, block_ids)
                if not self.cpu.holds(k) and self._where(k) is None
            }.items()
        )
        for k in keys:
            self.cpu.lru.touch(k)
        if self.cpu.num_slots == 0:
            return 0
        pending = new
        while pending:
            room = self._offload_room(len(pending))
            if room < len(pending) and len(self._offloads):
                self._publish_offloads(wait=True)  # frees pinned slots and staging memory
                room = self._offload_room(len(pending))
            if room == 0:
                raise TierFullError(f"offload of {len(pending)} blocks: every CPU slot is pinned")
            batch, pending = pending[:room], pending[room:]
            staging = view.read_rows([b for _, b in batch])
            slots, evicted = self.cpu.reserve([k for k, _ in batch], keep_evicted=self._spills_down)
            self._spill_down(evicted)  # type: ignore[arg-type]
            self._offloads.enqueue([k for k, _ in batch], slots, staging, held)
        return len(new)

    def _offload_room(self, wanted: int) -> int:
        budget = max(
            1, (self._max_staging_bytes - self._offloads.num_bytes) // self.bytes_per_block
        )
        return min(wanted, self.cpu.lru.num_evictable(), budget)

    def _publish_offloads(self, wait: bool = False) -> None:
        for spill in self._offloads.pop_finished(wait):
            if spill.failed:
                self.cpu.unreserve(spill.keys)
            else:
                self.cpu.publish(spill.keys)

    def _where(self, key: bytes) -> Tier | None:
        if key in self.cpu:
            return Tier.CPU
        if self.nvme is not None and (key in self.nvme or key in self._spill.pending):
            return Tier.NVME
        return None

    def _fetch(self, key: bytes) -> torch.Tensor | None:
        if key in self.cpu:
            self._stats[Tier.CPU].hits += 1
            return self.cpu.get([key])
        self._stats[Tier.CPU].misses += 1
        row = self._spill.pending.get(key)
        if row is None and self.nvme is not None:
            payload = self.nvme.read(key)
            row = (
                torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                if payload is not None
                else None
            )
        if row is None:
            self._stats[Tier.NVME].misses += 1
            return None
        self._stats[Tier.NVME].hits += 1
        if self.cpu.num_slots and self.cpu.lru.num_evictable():  # promote
            self._spill_down(self.cpu.put([key], row.view(1, -1), keep_evicted=self._spills_down))  # type: ignore[arg-type]
        return row.view(1, -1)

    @property
    def _spills_down(self) -> bool:
        """Whether CPU-tier evictions go anywhere (else they are dropped without a copy)."""
        return spill_target(Tier.CPU, self._enabled) is not None

    def _spill_down(self, evicted: list[tuple[bytes, torch.Tensor]]) -> None:
        self._stats[Tier.CPU].evictions += len(evicted)
        if spill_target(Tier.CPU, self._enabled) is None:
            return
        for key, row in evicted:
            try:
                self._queue.put_nowait((key, row))
                self._spill.pending[key] = row
            except queue.Full:
                self._stats[Tier.NVME].spill_dropped += 1

    def _spill_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                key, row = item
                assert self.nvme is not None
                payload = row.numpy().tobytes()
                with self._lock:
                    if self._spill.pending.pop(key, None) is not None:
                        self.nvme.write(key, payload)
            except Exception:  # noqa: BLE001 - background threads fail loudly, never silently
                log.exception("kvtransfer tier spill failed")
                with self._lock:
                    self._stats[Tier.NVME].failures += 1
            finally:
                self._queue.task_done()
        self._queue.task_done()
