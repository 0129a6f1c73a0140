"""Exponential noise for the exponential-race sampler: argmax(probs / E), E ~ Exp(1).

The winner of the race is distributed exactly as `probs`, and all rows sample in one op.
Unseeded rows share one batched draw from the device's default generator. A seeded row
draws its own [V] noise from a fresh `torch.Generator` on the device seeded with
`engine.sampling.seeds.step_seed(seed, num_output_tokens)`, so its tokens depend only on the
request (its seed, how many tokens it has produced, its logits), never on batch size, row
position or neighbours.
Hazard: reproducibility holds for one device type and torch version; CPU and CUDA
generators produce different streams for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_TINY = torch.finfo(torch.float32).tiny


def exponential_noise(
    seeds: Sequence[int | None], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """[len(seeds), vocab_size] float32 Exp(1) noise; row i seeded by `seeds[i]` when not None.

    `seeds[i]` is already a per-step seed (see `step_seed`). Values are clamped away from 0
    so the division in the race never produces inf.
    """
    noise = torch.empty(len(seeds), vocab_size, dtype=torch.float32, device=device)
    if any(s is None for s in seeds):
        noise.exponential_()
    for row, seed in enumerate(seeds):
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            noise[row].exponential_(generator=generator)
    return noise.clamp_min_(_TINY)
