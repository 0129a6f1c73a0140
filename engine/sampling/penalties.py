"""Logit edits that depend on a request's history: min_tokens and the three penalties.

- min_tokens: while fewer than `min_tokens` tokens were produced, EOS ids (unless
  `ignore_eos`) and `stop_token_ids` get -inf.
- repetition_penalty (Hugging Face `RepetitionPenaltyLogitsProcessor`): every token present
  in the prompt or the output has its logit divided by the penalty if positive, multiplied
  by it otherwise.
- presence / frequency penalties (OpenAI): over output tokens only,
  `logit -= presence * [count > 0] + frequency * count`.

Each function edits `logits` ([B, V] float32) in place and touches only the rows that need it.
Hazard: token ids >= V (a tokenizer larger than the model's vocabulary) would be an illegal
index on the device, which kills the process on CUDA; they are routed to a spare column
instead of being checked on the host, so no device sync is needed.
Cost: the penalty rows' prompt and output ids are copied to the device each step
(O(context) host work per penalized row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.sampling.batch import min_tokens_active, uses_penalties
from engine.scheduler.output import ScheduledRequest


def _scatter_index(
    token_lists: Sequence[Sequence[int]], num_columns: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) index tensors for `token_lists[row]`; ids >= num_columns map to num_columns."""
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    flat = [t for tokens in token_lists for t in tokens]
    cols = torch.tensor(flat, dtype=torch.int64).clamp_(0, num_columns)
    return rows.to(device), cols.to(device)


def forbidden_ids(request: ScheduledRequest, eos_token_ids: Sequence[int]) -> list[int]:
    """Ids a request may not emit yet (empty once min_tokens is reached)."""
    if not min_tokens_active(request):
        return []
    params = request.sampling_params
    eos = [] if params.ignore_eos else list(eos_token_ids)
    return eos + list(params.stop_token_ids)


def apply_min_tokens(
    logits: torch.Tensor, requests: Sequence[ScheduledRequest], eos_token_ids: Sequence[int]
) -> None:
    """Set -inf on EOS / stop ids of rows that have not yet produced `min_tokens` tokens."""
    per_row = [forbidden_ids(r, eos_token_ids) for r in requests]
    if not any(per_row):
        return
    rows, cols = _scatter_index(per_row, logits.shape[1], logits.device)
    mask = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
    mask[rows, cols] = True
    logits.masked_fill_(mask[:, :-1], float("-inf"))


def _output_counts(
    requests: Sequence[ScheduledRequest], num_columns: int, device: torch.device
) -> torch.Tensor:
    """[R, V] float32 count of each token in each request's output."""
    outputs = [r.output_token_ids for r in requests]
    counts = torch.zeros(len(requests), num_columns + 1, dtype=torch.float32, device=device)
    rows, cols = _scatter_index(outputs, num_columns, device)
    counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), accumulate=True)
    return counts[:, :-1]


def _prompt_mask(
    requests: Sequence[ScheduledRequest], num_columns: int, device: torch.device
) -> torch.Tensor:
    """[R, V] bool: the token occurs in the request's prompt."""
    prompts = [r.prompt_token_ids for r in requests]
    mask = torch.zeros(len(requests), num_columns + 1, dtype=torch.bool, device=device)
    rows, cols = _scatter_index(prompts, num_columns, device)
    mask[rows, cols] = True
    return mask[:, :-1]


def apply_penalties(logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
    """Repetition (HF), then presence and frequency (OpenAI) penalties, on the rows that set any."""
    row_ids = [i for i, r in enumerate(requests) if uses_penalties(r.sampling_params)]
    if not row_ids:
        return
    chosen = [requests[i] for i in row_ids]
    device = logits.device
    num_columns = logits.shape[1]
    params = torch.tensor(
        [
            [r.sampling_params.repetition_penalty for r in chosen],
            [r.sampling_params.presence_penalty for r in chosen],
            [r.sampling_params.frequency_penalty for r in chosen],
        ],
        dtype=torch.float32,
    ).to(device)
    repetition, presence, frequency = (p.unsqueeze(1) for p in params)
    rows = torch.tensor(row_ids, dtype=torch.int64).to(device)
    sub = logits[rows]
    counts = _output_counts(chosen, num_columns, device)
    seen = _prompt_mask(chosen, num_columns, device) | (counts > 0)
    penalized = torch.where(sub > 0, sub / repetition, sub * repetition)
    sub = torch.where(seen, penalized, sub)
    sub = sub - presence * (counts > 0).float() - frequency * counts
    logits[rows] = sub
