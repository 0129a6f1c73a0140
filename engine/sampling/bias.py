"""logit_bias (OpenAI): each (token id, bias) pair of a request is added to that row's logits.

Applied to the raw logits (right after the padded vocabulary is sliced off), before the
grammar mask, min_tokens and penalties: -100 all but bans a token, +100 all but forces it.
One batched `index_put_` per step over every biased row; rows without a bias are untouched.
Ids are checked against the vocabulary when the request is added (`check_vocab`); any id
>= V left here is dropped on the host (an illegal device index would kill a CUDA process).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.scheduler.output import ScheduledRequest


def apply_logit_bias(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
    """Add every row's logit_bias to `logits` ([B, V] float32) in place."""
    num_columns = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, r in enumerate(requests):
        for token, bias in r.sampling_params.logit_bias:
            if token < num_columns:
                rows.append(i)
                cols.append(token)
                values.append(float(bias))
    if not rows:
        return
    device = logits.device
    index = torch.tensor([rows, cols], dtype=torch.int64).to(device)
    bias_values = torch.tensor(values, dtype=logits.dtype).to(device)
    logits.index_put_((index[0], index[1]), bias_values, accumulate=True)
