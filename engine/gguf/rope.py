"""Llama 3.1's rope scaling, recovered from the `rope_freqs` tensor llama.cpp writes for it.

llama.cpp stores no rope-scaling metadata for Llama 3.1 / 3.2: its converter writes each
frequency's divisor instead (1 for high frequencies, `factor` for low ones, smoothed between).
Hugging Face's config computes those divisors from `rope_scaling`, so we find the one llama3
`rope_scaling` that reproduces the file's divisors, and refuse a file it does not reproduce
rather than run it with silently different positions. (transformers ignores the tensor.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Meta's values for every Llama 3.1 / 3.2 / 3.3 checkpoint; only `factor` is read from the file.
_LLAMA3_DEFAULTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_scaling(divisors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any] | None:
    """The llama3 `rope_scaling` whose frequency divisors are `divisors`, None for all ones.

    Raises ValueError when no such scaling with Meta's parameters reproduces them."""
    from engine.layers.rotary import inverse_frequencies

    divisors = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if np.allclose(divisors, 1.0):
        return None
    scaling = {"rope_type": "llama3", "factor": float(divisors.max()), **_LLAMA3_DEFAULTS}
    base = inverse_frequencies(head_dim, theta, None).double()
    implied = (base / inverse_frequencies(head_dim, theta, scaling).double()).numpy()
    if implied.shape != divisors.shape or not np.allclose(implied, divisors, rtol=1e-4):
        raise ValueError(
            "its rope_freqs are not Llama 3 rope scaling with factor "
            f"{scaling['factor']:g}, low/high frequency factors 1/4 and an original context of 8192"
        )
    return scaling
