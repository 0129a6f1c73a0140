"""The tiered store seen by an engine: `engine.kv.external.ExternalKVCache` over a TieredStore
and the engine's own KV cache view. Attach with `LLMEngine.attach_external_cache(...)`.

Evicted HBM blocks spill into the CPU tier (and on down to NVMe); prefix lookups continue from
HBM into the tiers along the hash chain; hits are copied back into HBM blocks. Everything runs
on the engine thread, so the blocks named here are stable during each call."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from kvtransfer.cache_view import KVCacheView
from kvtransfer.tiers.store import TieredStore

log = logging.getLogger(__name__)


class TieredEngineCache:
    def __init__(self, store: TieredStore, view: KVCacheView) -> None:
        self.store = store
        self.view = view
        self.num_spill_failures = 0

    def spill(self, block_id: int, block_hash: bytes) -> None:
        try:
            self.store.store([block_hash], self.view, [block_id])
        except Exception:  # a lost spill is a future miss, never the engine's failure
            self.num_spill_failures += 1
            log.exception("KV tier spill failed (block %d)", block_id)

    def count_prefix(self, block_hashes: Sequence[bytes]) -> int:
        return len(self.store.lookup_prefix(block_hashes))

    def load(self, block_hashes: Sequence[bytes], block_ids: Sequence[int]) -> int:
        return self.store.load(block_hashes, self.view, block_ids)
