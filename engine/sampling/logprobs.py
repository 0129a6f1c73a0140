"""Log-probabilities reported to the user.

They are `log_softmax` of the logits after masking and penalties but before temperature and
truncation (what the model, with the request's penalties, thinks of each token), read for
the rows that set `sampling_params.logprobs`. One `topk` of the largest N asked in the batch
serves every row, and the results cross to the host in three copies per step, not per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.scheduler.output import TokenLogprobs


def gather_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int | None]
) -> list[TokenLogprobs | None]:
    """Per row: the logprob of `token_ids[row]` and the top `num_top[row]` (id, logprob), descending.

    `logits` is [B, V] float32; rows whose `num_top` is None get None. Ties in the top-N are
    ordered as `torch.topk` returns them.
    """
    row_ids = [i for i, n in enumerate(num_top) if n is not None]
    if not row_ids:
        return [None] * len(num_top)
    rows = torch.tensor(row_ids, dtype=torch.int64).to(logits.device)
    logprobs = torch.log_softmax(logits[rows], dim=-1)
    chosen = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1)
    max_top = max(n for n in num_top if n is not None)
    top = torch.topk(logprobs, min(max_top, logprobs.shape[1]), dim=-1)
    chosen_host = chosen.tolist()
    values_host = top.values.tolist()
    ids_host = top.indices.tolist()
    result: list[TokenLogprobs | None] = [None] * len(num_top)
    for k, row in enumerate(row_ids):
        n = num_top[row]
        assert n is not None
        pairs = list(zip(ids_host[k][:n], values_host[k][:n]))
        result[row] = TokenLogprobs(logprob=chosen_host[k], top=pairs)
    return result
