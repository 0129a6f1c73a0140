"""Verification of draft tokens: keep the longest run the target model agrees with, then one
token of the target's own, so that the output is distributed exactly as without speculation.

A request with d drafts owns d + 1 consecutive rows of the step's logits: row j is the target's
prediction after the real token and drafts 1..j. Each row is processed by the sampler's own
stages (logit_bias, min_tokens, penalties; engine.sampler) as if drafts 1..j were already
output, so every `SamplingParams` option applies to the target exactly as it would one token
at a time. Then, row by row:
- greedy: draft j is accepted while it equals the row's argmax; the first row that disagrees
  (or the last row, when every draft was accepted) gives the argmax as the final token, so the
  tokens equal plain greedy decoding;
- sampled: the proposers are deterministic (a draft is a point mass q = 1 at its token), so
  draft j is accepted with probability min(1, p(d) / q(d)) = p(d); on rejection the final token
  is drawn from the residual max(p - q, 0), normalised: p without d. This is the rejection
  sampling of Leviathan et al. / Chen et al. (2023) for a one-hot q, which keeps the target's
  distribution exactly; with every draft accepted the final (bonus) token is drawn from the
  last row's p.
Draws: the residual and bonus samples use the sampler's exponential race with the row's own
noise (a seeded row: `step_seed(seed, tokens so far)`, as without speculation); the acceptance
coins are uniform draws (a seeded row: `accept_seed`). Seeded output is therefore
reproducible run to run but differs from the same seed without speculation (the distribution
is the same; the draws are not).
Rows with structured output never carry drafts (the scheduler gives them no lookahead).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from engine.device_sync import to_host
from engine.sampler import Sampler
from engine.sampling.batch import needs_full_path
from engine.sampling.logprobs import gather_logprobs
from engine.sampling.seeds import accept_seed
from engine.scheduler.output import ScheduledRequest, TokenLogprobs


@dataclass(frozen=True)
class Verified:
    """One request's verdict: the accepted drafts, then the target's next token."""

    accepted: list[int]
    final_token: int
    logprobs: list[TokenLogprobs] | None  # one per token (accepted..., final) where asked


def expand_rows(
    requests: Sequence[ScheduledRequest],
) -> tuple[list[ScheduledRequest], list[int | None]]:
    """Rows and the draft each row verifies (None: a request's last row). Row j of a request
    with drafts sees drafts 1..j as output (penalties, min_tokens, seeds); a request without
    drafts is one row, itself."""
    rows: list[ScheduledRequest] = []
    row_drafts: list[int | None] = []
    for s in requests:
        drafts = s.draft_token_ids
        for j in range(len(drafts) + 1):
            rows.append(
                s if j == 0 else replace(s, output_token_ids=s.output_token_ids + drafts[:j])
            )
            row_drafts.append(drafts[j] if j < len(drafts) else None)
    return rows, row_drafts


class Verifier:
    """Turns the logits of a verify step into each request's tokens (see the module doc)."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]
    ) -> list[Verified]:
        rows, row_drafts = expand_rows(requests)
        assert logits.shape[0] == len(rows), f"{logits.shape[0]} logits rows, {len(rows)} rows"
        if not any(needs_full_path(r) for r in rows):
            fast = to_host(logits[:, : self.sampler.vocab_size].argmax(dim=-1))
            return self._walk(requests, fast, fast, [], None, rows)
        processed = self.sampler.process(logits, rows)
        argmax = processed.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.sampling_params.greedy]
        argmax_host = to_host(argmax)
        race_host: list[int] = argmax_host
        coins: list[tuple[float, float]] = []
        if sampled:
            race_host, coins = self._draw(processed, rows, row_drafts, sampled, argmax)
        return self._walk(requests, argmax_host, race_host, coins, processed, rows)

    def _draw(
        self,
        processed: torch.Tensor,
        rows: list[ScheduledRequest],
        row_drafts: list[int | None],
        sampled: list[int],
        argmax: torch.Tensor,
    ) -> tuple[list[int], list[tuple[float, float]]]:
        """Per row: the token drawn from its residual (from p itself where the row verifies no
        draft; greedy rows keep their argmax), and (p(draft), coin) for sampled rows with a
        draft ((1, 0): accept, elsewhere)."""
        device = processed.device
        chosen = [rows[i] for i in sampled]
        sampled_index = torch.tensor(sampled, device=device)
        probs = self.sampler.probs(processed[sampled_index], chosen)
        with_draft = [k for k, i in enumerate(sampled) if row_drafts[i] is not None]
        coins = [(1.0, 0.0)] * len(rows)
        if with_draft:
            index = torch.tensor(with_draft, device=device)
            cols = torch.tensor([row_drafts[sampled[k]] for k in with_draft], device=device)
            p_draft = probs[index, cols].tolist()
            probs[index, cols] = 0.0  # the residual: p without the (rejected) draft
            draws = _coins([chosen[k] for k in with_draft])
            for k, p, coin in zip(with_draft, p_draft, draws):
                coins[sampled[k]] = (float(p), coin)
        race = (probs / self.sampler.noise(chosen, device)).argmax(dim=-1)
        merged = argmax.clone()
        merged[sampled_index] = race
        return to_host(merged), coins

    def _walk(
        self,
        requests: Sequence[ScheduledRequest],
        argmax: list[int],
        drawn: list[int],
        coins: list[tuple[float, float]],
        processed: torch.Tensor | None,
        rows: list[ScheduledRequest],
    ) -> list[Verified]:
        verdicts: list[tuple[list[int], int, list[int]]] = []
        base = 0
        for s in requests:
            drafts = s.draft_token_ids
            greedy = s.sampling_params.greedy
            accepted: list[int] = []
            final = None
            for j, draft in enumerate(drafts):
                row = base + j
                ok = draft == argmax[row] if greedy else coins[row][1] < coins[row][0]
                if not ok:
                    final = argmax[row] if greedy else drawn[row]
                    break
                accepted.append(draft)
            if final is None:
                last = base + len(drafts)
                final = argmax[last] if greedy else drawn[last]
            verdicts.append((accepted, final, list(range(base, base + len(accepted) + 1))))
            base += len(drafts) + 1
        logprobs = self._logprobs(verdicts, processed, rows)
        return [Verified(a, f, lp) for (a, f, _), lp in zip(verdicts, logprobs)]

    def _logprobs(
        self,
        verdicts: list[tuple[list[int], int, list[int]]],
        processed: torch.Tensor | None,
        rows: list[ScheduledRequest],
    ) -> list[list[TokenLogprobs] | None]:
        """Each kept token's logprob from its own row, for requests that ask."""
        used = [
            (row, token)
            for accepted, final, kept in verdicts
            if rows[kept[0]].sampling_params.logprobs is not None
            for row, token in zip(kept, [*accepted, final])
        ]
        if processed is None or not used:
            return [None] * len(verdicts)
        index = torch.tensor([row for row, _ in used], device=processed.device)
        tokens = torch.tensor([token for _, token in used], device=processed.device)
        nums = [rows[row].sampling_params.logprobs for row, _ in used]
        flat = iter(gather_logprobs(processed[index], tokens, nums))
        out: list[list[TokenLogprobs] | None] = []
        for _, _, kept in verdicts:
            if rows[kept[0]].sampling_params.logprobs is None:
                out.append(None)
            else:
                out.append([lp for lp in (next(flat) for _ in kept) if lp is not None])
        return out


def _coins(rows: Sequence[ScheduledRequest]) -> list[float]:
    """Uniform [0, 1) acceptance draws, seeded rows from `accept_seed`."""
    unseeded = torch.rand(len(rows)).tolist()
    return [
        unseeded[k]
        if r.sampling_params.seed is None
        else random.Random(accept_seed(r.sampling_params.seed, len(r.output_token_ids))).random()
        for k, r in enumerate(rows)
    ]
