"""Top-k, top-p and min-p truncation of temperature-scaled logits, batched over rows.

Applied in that order; a dropped token gets -inf. Each stage sees the distribution left by
the previous one (top-p's nucleus is computed on the top-k-renormalized probabilities).
- top-k: keep the k highest logits (k = vocabulary size disables it). On the sort path ties
  at the k-th value are broken by sort order, so exactly k survive; on the top-k-only path
  every token tied with the k-th value survives.
- top-p: keep the smallest prefix of the descending-sorted tokens whose mass >= top_p, i.e.
  a token stays when the mass strictly before it is < top_p. The top token always stays;
  top_p = 1 keeps everything (no float32 cumsum rounding can drop a tail token).
- min-p: drop tokens whose probability is < min_p * the highest probability.
A full sort of [B, V] happens only when some row uses top-p.
"""

from __future__ import annotations

import torch

from engine.sampling.batch import SamplingBatch

_NEG_INF = float("-inf")


def _top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Mask logits below each row's k-th highest value, via one topk of the largest k."""
    top_values = torch.topk(logits, max_k, dim=-1).values
    k = top_k.unsqueeze(1)
    kth = top_values.gather(1, k.clamp(max=max_k) - 1)
    kth = kth.masked_fill(k > max_k, _NEG_INF)  # rows with top-k off (k = vocabulary size)
    return logits.masked_fill(logits < kth, _NEG_INF)


def _top_k_top_p(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Both stages on one descending sort; the mask is scattered back to vocabulary order."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    positions = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    drop = positions >= params.top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    top_p = params.top_p.unsqueeze(1)
    # The top token has mass_before == 0 < top_p, so it always stays.
    drop |= (mass_before >= top_p) & (top_p < 1.0)
    return logits.masked_fill(torch.empty_like(drop).scatter_(1, order, drop), _NEG_INF)


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, _NEG_INF)


def truncate(logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
    """Return `logits` ([R, V] float32, already divided by temperature) with dropped tokens at -inf."""
    if params.any_top_p:
        logits = _top_k_top_p(logits, params)
    elif params.any_top_k:
        logits = _top_k_only(logits, params.top_k, params.max_top_k)
    if params.any_min_p:
        logits = _min_p(logits, params.min_p)
    return logits
