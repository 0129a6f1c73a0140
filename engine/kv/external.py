"""The seam between the engine's HBM block pool and a cache below it (kvtransfer's tiered
CPU / NVMe store). The engine imports nothing of kvtransfer: a worker attaches an object that
satisfies this protocol with `LLMEngine.attach_external_cache`.

Contract (every call on the engine thread):
* `spill(block_id, block_hash)` runs when the pool reuses a cached free block: the block still
  holds that hash's KV. The cache may buffer it; `flush_spills()` (called by the KV manager
  right after each allocation, before anything writes to the evicted blocks) copies every
  buffered block out in one batch. On a GPU that copy may be enqueued rather than finished:
  it must be ordered (on the engine's current stream, or by an event that stream waits on)
  before any later kernel that writes the blocks. Failures are the cache's to swallow and
  count: a spill that did not happen is a future miss, never an error.
* `count_prefix(hashes)` says how many leading hashes the cache holds now (no side effects).
* `fetch(hashes)` copies the cached prefix into a staging copy and returns it with the number
  of blocks that landed (fewer than asked when an entry vanished or failed its checksum: a
  miss); `write(staged, block_ids)` then puts it into HBM blocks. Both may be enqueued on the
  engine's current stream without a host wait (the step that reads the blocks follows them). The two are split because
  allocating the destination blocks may evict HBM blocks whose spills push the very entries
  being loaded out of the cache: fetching first makes that harmless.
`step_done()` runs after each engine step (its sampled tokens on the host): background copies
the step's allocations queued (spills) may start then, so they do not hold up the step's own
device -> host copy of its tokens.
Keys are the block-hash spec's hashes (salted by model), so another model's blocks never hit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class ExternalKVCache(Protocol):
    def spill(self, block_id: int, block_hash: bytes) -> None: ...

    def flush_spills(self) -> None: ...

    def step_done(self) -> None: ...

    def count_prefix(self, block_hashes: Sequence[bytes]) -> int: ...

    def fetch(self, block_hashes: Sequence[bytes]) -> tuple[int, object]: ...

    def write(self, staged: object, block_ids: Sequence[int]) -> None: ...


class PreemptionSwap(Protocol):
    """Where a preempted request's computed KV waits instead of being recomputed.

    `swap_out` copies the blocks out before they are freed (False: no room, recompute instead);
    `swap_in` copies them into the new blocks at re-admission; `discard` drops a swapped copy
    whose request ended while waiting. All on the engine thread.
    """

    def swap_out(self, request_id: str, block_ids: Sequence[int]) -> bool: ...

    def swap_in(self, request_id: str, block_ids: Sequence[int]) -> None: ...

    def discard(self, request_id: str) -> None: ...
