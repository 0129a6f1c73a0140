"""The block-hash spec v1 (engine/kv/block_hash.py, docs/kv-block-hash.md).

The byte layout is re-derived here from the written spec with hashlib directly, so a change
to the implementation that silently changes every key (and breaks cross-process, cross-tier
and cross-version hits) fails these tests.
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from engine.kv.block_hash import (
    BLOCK_HASH_BYTES,
    BLOCK_HASH_SPEC_VERSION,
    ROOT_PARENT,
    hash_block,
    hash_blocks,
)


def spec_hash(parent: bytes, salt: str, tokens: list[int]) -> bytes:
    """The spec as written in the doc, independently of the implementation."""
    salt_bytes = salt.encode("utf-8")
    data = (
        b"tandem-kv-v1"
        + parent
        + len(salt_bytes).to_bytes(4, "little")
        + salt_bytes
        + b"".join(t.to_bytes(4, "little") for t in tokens)
    )
    return hashlib.blake2b(data, digest_size=16).digest()


def test_constants() -> None:
    assert BLOCK_HASH_SPEC_VERSION == 1
    assert BLOCK_HASH_BYTES == 16
    assert ROOT_PARENT == bytes(16)


def test_matches_written_byte_layout() -> None:
    tokens = [0, 1, 2**32 - 1, 128000]
    assert hash_block(None, "llama-3-8b", tokens) == spec_hash(bytes(16), "llama-3-8b", tokens)
    parent = spec_hash(bytes(16), "s", [5, 6, 7, 8])
    assert hash_block(parent, "s", [9, 10, 11, 12]) == spec_hash(parent, "s", [9, 10, 11, 12])
    assert hash_block(None, "модель", [1]) == spec_hash(bytes(16), "модель", [1])  # UTF-8 salt


def test_chain_over_full_blocks_only() -> None:
    tokens = list(range(37))
    hashes = hash_blocks(tokens, 16, "m")
    assert len(hashes) == 2  # the 5-token tail is never hashed
    assert hashes[0] == hash_block(None, "m", tokens[:16])
    assert hashes[1] == hash_block(hashes[0], "m", tokens[16:32])
    assert all(len(h) == 16 for h in hashes)
    assert hash_blocks(tokens[:15], 16, "m") == []


def test_extending_a_chain_equals_hashing_from_scratch() -> None:
    tokens = list(range(100, 164))
    full = hash_blocks(tokens, 8, "m")
    head = hash_blocks(tokens[:24], 8, "m")
    tail = hash_blocks(tokens, 8, "m", parent=head[-1], start_block=3)
    assert head + tail == full
    assert hash_blocks(tokens[24:], 8, "m", parent=head[-1]) == tail


def test_every_input_changes_the_hash() -> None:
    base = hash_block(None, "m", [1, 2, 3, 4])
    assert hash_block(None, "m2", [1, 2, 3, 4]) != base  # salt: another model never hits
    assert hash_block(ROOT_PARENT, "m", [1, 2, 3, 4]) == base  # None is the zero parent
    assert hash_block(b"\x01" * 16, "m", [1, 2, 3, 4]) != base  # parent: position in sequence
    assert hash_block(None, "m", [1, 2, 3, 5]) != base
    assert hash_block(None, "m", [2, 1, 3, 4]) != base
    # The length prefix keeps salt bytes from being confused with token bytes.
    assert hash_block(None, "a\x01\x00\x00\x00", []) != hash_block(None, "a", [1])


def test_same_prefix_same_hashes_different_suffix_diverges() -> None:
    a = hash_blocks(list(range(48)), 16, "m")
    b = hash_blocks(list(range(32)) + [7] * 16, 16, "m")
    assert a[:2] == b[:2] and a[2] != b[2]
    # A change in an early block changes every later hash (the chain).
    c = hash_blocks([999] + list(range(1, 48)), 16, "m")
    assert all(x != y for x, y in zip(a, c))


def test_out_of_range_token_ids_are_rejected() -> None:
    with pytest.raises(struct.error):
        hash_block(None, "m", [2**32])
    with pytest.raises(struct.error):
        hash_block(None, "m", [-1])


def test_seedless_across_processes() -> None:
    """Same key in another interpreter with another PYTHONHASHSEED (unlike Python's hash)."""
    code = (
        "from engine.kv.block_hash import hash_blocks;"
        "print(b''.join(hash_blocks(list(range(64)), 16, 'salt')).hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == b"".join(hash_blocks(list(range(64)), 16, "salt")).hex()


VECTORS = [  # also listed in docs/kv-block-hash.md: a change here is a new spec version
    ("llama-3-8b", 0, "ae1ecfe3d627d96b05019a5c5c520c89"),
    ("llama-3-8b", 1, "d57360c57dc03900ad06240c42a8a5f1"),
    ("qwen2-7b", 0, "f268507c6f8cfe7cb9adb598d238e419"),
]


@pytest.mark.parametrize(("salt", "index", "expected"), VECTORS)
def test_published_vectors(salt: str, index: int, expected: str) -> None:
    tokens = list(range(32))
    got = hash_blocks(tokens, 16, salt)[index]
    assert got.hex() == expected
    parent = bytes(16) if index == 0 else spec_hash(bytes(16), salt, tokens[:16])
    assert spec_hash(parent, salt, tokens[16 * index : 16 * (index + 1)]) == got
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "kv-block-hash.md"), encoding="utf-8") as f:
        assert expected in f.read()
