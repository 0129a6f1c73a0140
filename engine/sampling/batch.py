"""Per-row truncation parameters of a step's sampled (non-greedy) rows, as device tensors.

Built once per step from the scheduled requests (a Python loop over rows, never over the
vocabulary). Python-side flags say which stages any row needs, so the sampler skips the rest.
Also holds the small predicates that decide which stages a request needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams
from engine.scheduler.output import ScheduledRequest


def uses_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def min_tokens_active(request: ScheduledRequest) -> bool:
    """True while the request has produced fewer than `min_tokens` tokens."""
    return len(request.output_token_ids) < request.sampling_params.min_tokens


def needs_full_path(request: ScheduledRequest) -> bool:
    """False when plain argmax of the raw logits is this row's whole answer."""
    params = request.sampling_params
    return (
        not params.greedy
        or uses_penalties(params)
        or min_tokens_active(request)
        or params.logprobs is not None
        or bool(params.logit_bias)
        or request.grammar is not None
    )


def reads_output_tokens(request: ScheduledRequest) -> bool:
    """True when sampling this row reads the request's output tokens: penalties, min_tokens,
    a seed (its noise stream follows the output length) or a grammar. Such a row cannot be
    sampled while the request's previous token is still on the device (overlap scheduling)."""
    params = request.sampling_params
    return (
        uses_penalties(params)
        or params.min_tokens > 0
        or params.seed is not None
        or request.grammar is not None
    )


@dataclass(frozen=True)
class SamplingBatch:
    """Parameters of R sampled rows, shape [R] each, on the logits' device.

    `top_k` holds the vocabulary size where top-k is off. The `any_*` flags and `max_top_k`
    (the largest k any row uses, 0 if none) are Python values, so reading them never syncs.
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    any_top_k: bool
    max_top_k: int
    any_top_p: bool
    any_min_p: bool

    @staticmethod
    def from_params(
        params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        assert all(not p.greedy for p in params), "greedy rows take the argmax path"
        floats = torch.tensor(
            [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]],
            dtype=torch.float32,
        ).to(device)
        top_k_values = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        enabled_k = [k for k in top_k_values if k < vocab_size]
        return SamplingBatch(
            temperature=floats[0],
            top_k=torch.tensor(top_k_values, dtype=torch.int64).to(device),
            top_p=floats[1],
            min_p=floats[2],
            any_top_k=bool(enabled_k),
            max_top_k=max(enabled_k, default=0),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p > 0.0 for p in params),
        )
