"""Integer arithmetic shared by the engine, the router and the test doubles.

Pure: imports nothing (the router uses it and must never import torch). Triton kernels keep
`triton.cdiv` / `tl.cdiv`, which compute the same inside launchers and kernels.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceil division of integers: `ceil(a / b)` without floats (e.g. tokens -> blocks)."""
    return -(-a // b)
