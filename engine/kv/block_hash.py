"""The block-hash spec: the one key for KV blocks in the engine, the router, transfers and tiers.

Spec version 1 (see docs/kv-block-hash.md):

    hash(block) = blake2b-128( b"tandem-kv-v1" || parent || salt_len || salt || token_ids )

* `parent` is the 16-byte hash of the previous block in the same sequence, or 16 zero bytes
  for the first block;
* `salt` is the model salt (UTF-8): it names the model, its dtype-independent identity and
  anything else that changes KV contents (e.g. a LoRA adapter). Two different salts never hit;
* `salt_len` is a 4-byte little-endian length, so salts cannot run into token bytes;
* `token_ids` are the block's `block_size` token ids as 4-byte little-endian unsigned integers.

The hash is seedless and process-independent (unlike Python's `hash`), so every process and
every tier computes the same key. Only full blocks are hashed.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BLOCK_HASH_SPEC_VERSION = 1
BLOCK_HASH_BYTES = 16
ROOT_PARENT = bytes(BLOCK_HASH_BYTES)
_DOMAIN = b"tandem-kv-v1"

BlockHash = bytes


def hash_block(parent: BlockHash | None, salt: str, token_ids: Sequence[int]) -> BlockHash:
    """Hash one full block given its parent's hash (None for the first block)."""
    h = hashlib.blake2b(digest_size=BLOCK_HASH_BYTES)
    h.update(_DOMAIN)
    h.update(parent if parent is not None else ROOT_PARENT)
    salt_bytes = salt.encode()
    h.update(struct.pack("<I", len(salt_bytes)))
    h.update(salt_bytes)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return h.digest()


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    salt: str,
    parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`, from block `start_block` on.

    `parent` must be the hash of block `start_block - 1` (None when starting at 0); this lets a
    caller extend an existing chain without rehashing it.
    """
    hashes: list[BlockHash] = []
    num_full = len(token_ids) // block_size
    for i in range(start_block, num_full):
        parent = hash_block(parent, salt, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes
