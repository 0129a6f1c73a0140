"""The router's guess of a prefill worker's prefix cache: the block hashes it recently saw.

The router records the prompt block hashes (the `engine.kv.block_hash` spec) it sent to each
worker, in an LRU of bounded size, and predicts a hit for the longest recorded prefix. It is an
estimate: the worker may have evicted blocks (then TTFT is a little worse than predicted).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from engine.kv.block_hash import BlockHash


class PrefixIndex:
    def __init__(self, capacity_blocks: int = 65536) -> None:
        assert capacity_blocks > 0
        self._capacity = capacity_blocks
        self._hashes: OrderedDict[BlockHash, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._hashes)

    def num_hit_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """Length of the longest prefix of `hashes` that was recorded."""
        n = 0
        for h in hashes:
            if h not in self._hashes:
                break
            n += 1
        return n

    def record(self, hashes: Sequence[BlockHash]) -> None:
        """Mark `hashes` as most recently seen, evicting the least recent beyond capacity."""
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self._capacity:
            self._hashes.popitem(last=False)
