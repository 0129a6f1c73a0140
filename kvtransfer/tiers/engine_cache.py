"""The tiered store seen by an engine: `engine.kv.external.ExternalKVCache` over a TieredStore
and the engine's own KV cache view. Attach with `LLMEngine.attach_external_cache(...)`.

Evicted HBM blocks spill into the CPU tier (and on down to NVMe); prefix lookups continue from
HBM into the tiers along the hash chain; hits are copied back into HBM blocks. Everything runs
on the engine thread, so the blocks named here are stable during each call.

Nothing here waits for the device: a spill gathers the evicted blocks on the engine's stream
(ordered before any kernel that reuses them) and copies them to pinned memory on a side
stream once the step is over (TieredStore.spill, then `step_done`); a hit's host -> device copy and its scatter into the new blocks are
enqueued on the engine's stream, ahead of the step that reads them."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import TierFullError
from kvtransfer.tiers.store import SwapHandle, TieredStore

log = logging.getLogger(__name__)


class TieredEngineCache:
    def __init__(self, store: TieredStore, view: KVCacheView) -> None:
        self.store = store
        self.view = view
        self.num_spill_failures = 0
        self._pending: list[tuple[int, bytes]] = []

    def spill(self, block_id: int, block_hash: bytes) -> None:
        self._pending.append((block_id, block_hash))

    def flush_spills(self) -> None:
        """One batched background copy of every block evicted by the last allocation."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            self.store.spill([h for _, h in pending], self.view, [b for b, _ in pending], held=True)
        except Exception:  # a lost spill is a future miss, never the engine's failure
            self.num_spill_failures += len(pending)
            log.exception("KV tier spill of %d blocks failed", len(pending))

    def step_done(self) -> None:
        """The step is over: the spills its allocations queued start copying out."""
        self.store.start_spills()

    def count_prefix(self, block_hashes: Sequence[bytes]) -> int:
        return len(self.store.lookup_prefix(block_hashes))

    def fetch(self, block_hashes: Sequence[bytes]) -> tuple[int, object]:
        rows = self.store.fetch(block_hashes, self.view.device)
        return int(rows.shape[0]), rows

    def write(self, staged: object, block_ids: Sequence[int]) -> None:
        self.store.write(staged, self.view, block_ids)  # type: ignore[arg-type]


class TieredSwap:
    """`engine.kv.external.PreemptionSwap` over the CPU tier: a preempted request's blocks wait
    in pinned CPU slots (pinned against eviction) until it is re-admitted."""

    def __init__(self, store: TieredStore, view: KVCacheView) -> None:
        self.store = store
        self.view = view
        self._handles: dict[str, SwapHandle] = {}
        self.num_swapped_out = 0
        self.num_swapped_in = 0

    def swap_out(self, request_id: str, block_ids: Sequence[int]) -> bool:
        try:
            self._handles[request_id] = self.store.swap_out(self.view, block_ids)
        except TierFullError:
            return False
        self.num_swapped_out += 1
        return True

    def swap_in(self, request_id: str, block_ids: Sequence[int]) -> None:
        self.store.swap_in(self._handles.pop(request_id), self.view, block_ids)
        self.num_swapped_in += 1

    def discard(self, request_id: str) -> None:
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            self.store.release_swap(handle)
