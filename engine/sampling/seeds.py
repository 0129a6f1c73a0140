"""Per-step generator seeds for seeded requests (pure: no torch).

A seeded row's noise at a step comes from `step_seed(seed, num_output_tokens)`. It uses
blake2b, never Python's `hash()` (salted per process), so every run and every worker
(prefill samples token 0, decode the rest) derives the same seed for the same step.
"""

from __future__ import annotations

import hashlib


def step_seed(seed: int, num_output_tokens: int) -> int:
    """A 63-bit generator seed derived from (seed, step), stable across processes and hosts."""
    digest = hashlib.blake2b(
        f"tandem-sampler:{seed}:{num_output_tokens}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def accept_seed(seed: int, num_output_tokens: int) -> int:
    """The seed of a seeded row's acceptance draw in speculative verification: independent of
    its sampling noise (`step_seed`), stable across processes like it."""
    digest = hashlib.blake2b(
        f"tandem-accept:{seed}:{num_output_tokens}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
