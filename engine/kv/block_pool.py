"""The paged-KV block pool: ref-counted blocks, a free LRU and the hash -> block prefix index.

Pure Python (no torch). A block id indexes dimension 2 of the engine's KV cache tensor.
Block 0 is the reserved null block: never handed out, never freed, never hashed (padding
writes land there).

A block is in exactly one of three states:

* in use      - ref count >= 1; it may carry a hash (a full block whose KV is computed);
* free        - ref count 0, no hash; reused first;
* cached free - ref count 0 with a hash; still findable by `lookup()` and revivable with
                `touch()` until an allocation needs it, which evicts its hash (least recently
                freed first) and calls `on_evict(block_id, block_hash)`.

Hazard: `on_evict` runs synchronously inside `allocate()` before the block is handed out, so
a tier store may copy the block's KV out in it, but it must not call back into the pool.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from engine.kv.block_hash import BlockHash

NULL_BLOCK_ID = 0

EvictCallback = Callable[[int, BlockHash], None]


class BlockPool:
    """Ref-counted KV blocks with an LRU of cached free blocks.

    Verb pairs separate the check from the change: `can_allocate(n)` / `allocate(n)`.
    `free()` takes a request's block table in table order and releases it back to front,
    so a request's tail blocks are evicted before its prefix (the prefix is more shareable).
    """

    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool = True,
        on_evict: EvictCallback | None = None,
    ) -> None:
        assert num_blocks >= 2, f"num_blocks={num_blocks}: need the null block and one more"
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.on_evict = on_evict
        self._ref_counts = [0] * num_blocks
        # Two free lists: blocks without a hash are reused first, so reuse evicts a cached
        # block only when nothing else is free. Both keep LRU order (oldest first).
        self._free_plain: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._hash_to_block: dict[BlockHash, int] = {}
        self._block_to_hash: dict[int, BlockHash] = {}

    # ----------------------------------------------------------------- counts

    @property
    def num_usable_blocks(self) -> int:
        """Every block but the null block."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now, cached free blocks included."""
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._free_cached)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks that carry a hash, in use or free."""
        return len(self._hash_to_block)

    def usage(self) -> float:
        """Fraction of usable blocks held by requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_to_hash.get(block_id)

    # ------------------------------------------------------------ allocation

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks with ref count 1. Call `can_allocate` first.

        Raises RuntimeError (an internal error: the scheduler checks first) if too few are free.
        """
        if not self.can_allocate(num_blocks):
            raise RuntimeError(
                f"allocate({num_blocks}): only {self.num_free_blocks} free blocks; "
                "the caller must check can_allocate() first"
            )
        block_ids = [self._pop_free() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def _pop_free(self) -> int:
        if self._free_plain:
            block_id, _ = self._free_plain.popitem(last=False)
            return block_id
        block_id, _ = self._free_cached.popitem(last=False)
        self._evict(block_id)
        return block_id

    def _evict(self, block_id: int) -> None:
        block_hash = self._block_to_hash.pop(block_id)
        del self._hash_to_block[block_hash]
        if self.on_evict is not None:
            self.on_evict(block_id, block_hash)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block of a block table, last block first.

        A block whose count reaches 0 goes to the tail of its free list (most recently freed).
        """
        for block_id in reversed(block_ids):
            assert block_id != NULL_BLOCK_ID, "the null block is never freed"
            count = self._ref_counts[block_id]
            assert count > 0, f"block {block_id} freed with ref count {count}"
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if block_id in self._block_to_hash:
                    self._free_cached[block_id] = None
                else:
                    self._free_plain[block_id] = None

    # ---------------------------------------------------------- prefix cache

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block holding `block_hash` (in use or cached free), or None. Changes nothing."""
        if not self.enable_caching:
            return None
        return self._hash_to_block.get(block_hash)

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks found by `lookup()` (a prefix hit).

        A block at ref count 0 leaves the free list, so no allocation can evict it.
        """
        for block_id in block_ids:
            assert block_id in self._block_to_hash, f"touch({block_id}): block carries no hash"
            if self._ref_counts[block_id] == 0:
                del self._free_cached[block_id]
            self._ref_counts[block_id] += 1

    def cache_full_block(self, block_id: int, block_hash: BlockHash) -> bool:
        """Register a just-filled, in-use block under `block_hash`; True if registered.

        If another block already holds the hash, the existing mapping stays (this block stays
        unhashed and is simply freed later). Re-registering a block under its own hash is a
        no-op. A no-op returning False when caching is disabled.
        """
        if not self.enable_caching:
            return False
        assert block_id != NULL_BLOCK_ID, "the null block is never cached"
        assert self._ref_counts[block_id] > 0, f"cache_full_block({block_id}): block is free"
        current = self._block_to_hash.get(block_id)
        if current is not None:
            assert current == block_hash, f"block {block_id} already holds another hash"
            return False
        if block_hash in self._hash_to_block:
            return False
        self._hash_to_block[block_hash] = block_id
        self._block_to_hash[block_id] = block_hash
        return True

    # -------------------------------------------------------------- checking

    def check_integrity(self) -> None:
        """Assert every invariant; O(num_blocks). For tests and debug builds."""
        counts = self._ref_counts
        assert counts[NULL_BLOCK_ID] == 0, "the null block has references"
        assert all(c >= 0 for c in counts), "negative ref count"
        plain, cached = set(self._free_plain), set(self._free_cached)
        assert not plain & cached, "a block is on both free lists"
        zero = {b for b in range(1, self.num_blocks) if counts[b] == 0}
        assert plain | cached == zero, "free lists differ from the ref-count-0 set"
        assert NULL_BLOCK_ID not in plain | cached, "the null block is on a free list"
        assert len(self._free_plain) + len(self._free_cached) == len(zero)
        assert all(b in self._block_to_hash for b in cached), "cached free block without hash"
        assert not any(b in self._block_to_hash for b in plain), "plain free block with hash"
        assert len(self._hash_to_block) == len(self._block_to_hash), "hash maps differ in size"
        for block_hash, block_id in self._hash_to_block.items():
            assert self._block_to_hash.get(block_id) == block_hash, "hash maps disagree"
        assert NULL_BLOCK_ID not in self._block_to_hash, "the null block carries a hash"
        assert 0 <= self.num_free_blocks <= self.num_usable_blocks
