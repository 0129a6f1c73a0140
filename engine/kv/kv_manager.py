"""Per-request KV block allocation and prefix-cache lookup on top of one engine's BlockPool.

Pure Python (no torch). The scheduler is the only caller; the runner only reads block tables.

Contract of a request's block table: `request.block_ids[i]` holds the KV of token positions
`[i * block_size, (i + 1) * block_size)`. Full blocks whose KV is computed are registered
under their block hash (engine.kv.block_hash, spec v1) so later requests with the same
prefix (and the same model salt) reuse them. A different salt or spec version gives a
different hash, hence a miss, never a wrong hit.
"""

from __future__ import annotations

from typing import NamedTuple

from engine.kv.block_hash import hash_blocks
from engine.kv.block_pool import BlockPool, EvictCallback
from engine.kv.external import ExternalKVCache
from engine.request import Request
from engine.utils.math import cdiv


class ComputedBlocks(NamedTuple):
    """A prefix hit: HBM blocks (table order), then `external_hashes` the cache below HBM holds
    (loaded into fresh blocks at allocation); `num_tokens` covers both."""

    block_ids: list[int]
    num_tokens: int
    external_hashes: tuple[bytes, ...] = ()


NO_BLOCKS = ComputedBlocks([], 0)


def token_slice(request: Request, start: int, end: int) -> list[int]:
    """`request.all_token_ids[start:end]` without copying the whole sequence."""
    prompt, output = request.prompt_token_ids, request.output_token_ids
    n = len(prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return output[start - n : end - n]
    return prompt[start:] + output[: end - n]


class KVManager:
    """Owns the BlockPool of one engine; allocates slots and serves prefix hits.

    `salt` names the model (and anything else that changes KV contents); it goes into every
    block hash. Hashes are extended lazily into `request.block_hashes` (full blocks only).
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        salt: str,
        enable_caching: bool = True,
        on_evict: EvictCallback | None = None,
    ) -> None:
        assert block_size >= 1, f"block_size={block_size}"
        self.block_size = block_size
        self.salt = salt
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_caching, on_evict=on_evict)
        self.external: ExternalKVCache | None = None
        self._external_hit_tokens = 0
        self._num_registered: dict[str, int] = {}  # request id -> full blocks already hashed
        self._prefix_queried_tokens = 0
        self._prefix_hit_tokens = 0

    # ----------------------------------------------------------------- stats

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def prefix_queried_tokens(self) -> int:
        """Tokens of admitted requests looked up in the prefix cache (recomputes included)."""
        return self._prefix_queried_tokens

    @property
    def prefix_hit_tokens(self) -> int:
        """Of those, tokens served from cached blocks."""
        return self._prefix_hit_tokens

    @property
    def external_hit_tokens(self) -> int:
        """Prefix-hit tokens served by the external cache (loaded into HBM)."""
        return self._external_hit_tokens

    def attach_external(self, cache: ExternalKVCache) -> None:
        """Spill evicted cached blocks into `cache` and extend prefix hits with what it holds."""
        self.external = cache
        self.pool.on_evict = cache.spill

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ----------------------------------------------------------------- hashes

    def _ensure_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Extend `request.block_hashes` to cover the first `num_full_blocks` blocks."""
        hashes = request.block_hashes
        start = len(hashes)
        if start >= num_full_blocks:
            return
        tokens = token_slice(request, start * self.block_size, num_full_blocks * self.block_size)
        parent = hashes[-1] if hashes else None
        hashes.extend(hash_blocks(tokens, self.block_size, self.salt, parent=parent))

    def block_hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """The hashes of the request's first `num_full_blocks` blocks (computed if need be)."""
        self._ensure_hashes(request, num_full_blocks)
        return list(request.block_hashes[:num_full_blocks])

    # ----------------------------------------------------------- prefix hits

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest cached prefix of the request's full blocks; changes no ref count.

        Never the whole sequence: at most `(num_tokens - 1) // block_size` blocks, so the last
        token is always computed (its logits give the next token). Valid only until the next
        allocation; pass it straight to `allocate_slots`.
        """
        if not self.enable_caching:
            return NO_BLOCKS
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._ensure_hashes(request, max_blocks)
        block_ids: list[int] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        external: tuple[bytes, ...] = ()
        if self.external is not None and len(block_ids) < max_blocks:
            rest = request.block_hashes[len(block_ids) : max_blocks]
            external = tuple(rest[: self.external.count_prefix(rest)])
        return ComputedBlocks(
            block_ids, (len(block_ids) + len(external)) * self.block_size, external
        )

    # ------------------------------------------------------------ allocation

    def _num_blocks_needed(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks
    ) -> int:
        """Free blocks this allocation consumes: new blocks plus revived cached free ones."""
        num_tokens = request.num_computed_tokens + computed.num_tokens + num_new_tokens
        num_held = len(request.block_ids) + len(computed.block_ids)
        num_new_blocks = max(0, self.num_blocks_for(num_tokens) - num_held)
        num_revived = sum(1 for b in computed.block_ids if self.pool.ref_count(b) == 0)
        return num_new_blocks + num_revived

    def can_allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: ComputedBlocks = NO_BLOCKS,
        num_reserved_blocks: int = 0,
    ) -> bool:
        """Whether `allocate_slots` would succeed and leave `num_reserved_blocks` free.

        `num_reserved_blocks` is the admission watermark: new requests leave that many blocks
        for running ones to grow into. Running requests pass 0.
        """
        needed = self._num_blocks_needed(request, num_new_tokens, computed_blocks)
        return self.pool.num_free_blocks - needed >= num_reserved_blocks

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: ComputedBlocks = NO_BLOCKS,
    ) -> int:
        """Grow `request.block_ids` to hold computed + cached + `num_new_tokens` tokens.

        With `computed_blocks` (admission only: the table must be empty) the cached blocks are
        touched first, so this allocation cannot evict them, and the hit is counted in the
        prefix stats. External hits are loaded into freshly allocated blocks and registered.
        Returns how many leading tokens have KV (HBM hits + external blocks that landed; fewer
        than promised when an external entry vanished: those tokens are computed instead); the
        caller sets `num_computed_tokens` to it. Raises RuntimeError if the pool is short (call
        `can_allocate_slots` first).
        """
        if not request.block_ids:  # admission: an empty table
            self._count_query(request, computed_blocks)
        staged = self._fetch_external(computed_blocks)  # before any allocation can evict them
        if computed_blocks.block_ids:
            assert not request.block_ids, "a prefix hit is only taken at admission"
            self.pool.touch(computed_blocks.block_ids)
            request.block_ids.extend(computed_blocks.block_ids)
            self._num_registered[request.request_id] = len(computed_blocks.block_ids)
        num_tokens = request.num_computed_tokens + computed_blocks.num_tokens + num_new_tokens
        num_new_blocks = self.num_blocks_for(num_tokens) - len(request.block_ids)
        if num_new_blocks > 0:
            request.block_ids.extend(self.pool.allocate(num_new_blocks))
            if self.external is not None:
                self.external.flush_spills()  # before anything writes to the evicted blocks
        return len(computed_blocks.block_ids) * self.block_size + self._write_external(
            request, computed_blocks, staged
        )

    def _fetch_external(self, computed: ComputedBlocks) -> tuple[int, object] | None:
        if not computed.external_hashes or self.external is None:
            return None
        return self.external.fetch(computed.external_hashes)

    def _write_external(
        self, request: Request, computed: ComputedBlocks, staged: tuple[int, object] | None
    ) -> int:
        """Write fetched external hits into the blocks after the HBM hits; tokens that landed."""
        if staged is None or self.external is None:
            return 0
        landed, rows = staged
        first = len(computed.block_ids)
        targets = request.block_ids[first : first + landed]
        if landed:
            self.external.write(rows, targets)
        for block_id, block_hash in zip(targets[:landed], computed.external_hashes[:landed]):
            self.pool.cache_full_block(block_id, block_hash)
        self._num_registered[request.request_id] = first + landed
        self._external_hit_tokens += landed * self.block_size
        return landed * self.block_size

    def _count_query(self, request: Request, computed: ComputedBlocks) -> None:
        if self.enable_caching:
            self._prefix_queried_tokens += request.num_tokens
            self._prefix_hit_tokens += len(computed.block_ids) * self.block_size

    def cache_blocks(self, request: Request) -> None:
        """Register every full block whose KV is now computed (prompt and output tokens).

        Call after each step that advanced `request.num_computed_tokens`.
        """
        if not self.enable_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        self._ensure_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache_full_block(request.block_ids[i], request.block_hashes[i])
        self._num_registered[request.request_id] = num_full

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the blocks past the first `num_tokens` tokens (lookahead slots that held
        rejected drafts). They were never registered in the prefix cache: only blocks full of
        computed tokens are, and those lie within `num_tokens` when it is the computed count."""
        keep = self.num_blocks_for(num_tokens)
        if len(request.block_ids) > keep:
            extra = request.block_ids[keep:]
            del request.block_ids[keep:]
            self.pool.free(extra)

    def detach(self, request: Request) -> list[int]:
        """Hand the request's blocks to a new owner (a KV lease) without freeing them; the owner
        later calls `release()`. Clears the request's table. Idempotent."""
        blocks = list(request.block_ids)
        request.block_ids.clear()
        self._num_registered.pop(request.request_id, None)
        return blocks

    def release(self, block_ids: list[int]) -> None:
        """Free blocks handed out by `detach()` (or allocated for an incoming transfer)."""
        self.pool.free(block_ids)

    def free(self, request: Request) -> None:
        """Free the request's blocks (tail first) and clear its table. Idempotent."""
        self.pool.free(request.block_ids)
        request.block_ids.clear()
        self._num_registered.pop(request.request_id, None)
