"""The proposer seam: where draft tokens come from.

Contract: `propose(rows)` gets the step's decode rows that have lookahead slots (each row's
`num_lookahead` is the most drafts it may take; its `prompt_token_ids + output_token_ids` is the
whole sequence, whose last token is the row's one real input) and returns, per row, up to that
many draft token ids (fewer, or none, is always allowed). It runs on the engine thread before the
verify forward pass; a proposer that runs a model on the device writes KV only into its own
cache, at slots of the rows' own blocks (a draft model rebuilds a prompt's draft KV below
`start_position`, and writes drafts into the lookahead slots). `forget(ids)` drops any state of
requests that left the batch (`SchedulerOutput.finished_ids`); it is called every step, with
ids it may never have seen. Hazard: a request's state outlives it by one step (its id arrives
with the next schedule), so an engine that stops stepping keeps the last finished requests'
few bytes until it steps again. `observe(rows, hidden, output)` follows every forward pass
with the final hidden states of the sampled rows (`hidden[i]` is the target's last hidden
state, after the final norm, of the i-th logits row of the step, so a request's rows are
consecutive: one per draft it verified, then one), and the step's RunnerOutput: the row that
produced request r's final token is its first row + len(output.accepted_draft_ids[r]). A
proposer that drafts from the target's features (a draft head) keeps what it needs from it;
`hidden` is only valid until the next step. Drafts are deterministic (one-hot proposals), which is
what verification assumes (engine.spec.verify).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from engine.scheduler.output import RunnerOutput, ScheduledRequest
from engine.spec.config import SpeculativeConfig
from engine.spec.ngram import NgramIndex


class Proposer(Protocol):
    # Whether `observe` reads each step's outputs (the runner then waits for every step's
    # tokens at launch); a proposer that reads only the token lists says False.
    observes: bool

    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]: ...

    def forget(self, request_ids: Sequence[str]) -> None: ...

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None: ...


class NgramProposer:
    """Prompt lookup over each row's own tokens (engine.spec.ngram), one `NgramIndex` per
    request: each `propose` feeds a row's index only the tokens it has not seen, so a step
    costs O(rows * max_n^2) on the host, not O(rows * context).

    A request's lists only grow while it runs. When a row no longer agrees with its index on
    cheap facts (the index is longer than the sequence, or the prompt length, the first token
    or the last indexed token differ: a request recomputed from a shorter sequence, or an id
    reused after an abort), the index is rebuilt from the row. Hazard: a reused id whose new
    sequence agrees on all of those facts but differs elsewhere keeps a stale index; that only
    costs acceptance (drafts are verified), never correctness. `forget` drops indexes; the
    runner calls it every step with the ids that left the batch, so nothing outlives its
    request by more than a step.
    """

    observes = False

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max
        self._indexes: dict[str, tuple[NgramIndex, int]] = {}  # id -> (index, num prompt tokens)

    @property
    def num_tracked(self) -> int:
        """How many requests hold an index (a leak check for tests)."""
        return len(self._indexes)

    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]:
        return [self._index_for(s).propose(s.num_lookahead) for s in rows]

    def _index_for(self, row: ScheduledRequest) -> NgramIndex:
        """The row's index, rebuilt if stale, caught up with the row's new tokens."""
        prompt, output = row.prompt_token_ids, row.output_token_ids
        entry = self._indexes.get(row.request_id)
        if entry is None or not _agrees(entry[0], entry[1], prompt, output):
            entry = (NgramIndex(self.min_n, self.max_n), len(prompt))
            self._indexes[row.request_id] = entry
        index = entry[0]
        known = index.num_tokens
        if known < len(prompt):
            index.extend(prompt[known:])
            index.extend(output)
        else:
            index.extend(output[known - len(prompt) :])
        return index

    def forget(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._indexes.pop(rid, None)

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None:
        pass


def _agrees(index: NgramIndex, num_prompt: int, prompt: list[int], output: list[int]) -> bool:
    """O(1) checks that `prompt + output` still extends what `index` holds."""
    known = index.num_tokens
    if num_prompt != len(prompt) or known > len(prompt) + len(output):
        return False
    if known == 0:
        return True
    first, last = _token_at(prompt, output, 0), _token_at(prompt, output, known - 1)
    return index.token_at(0) == first and index.token_at(known - 1) == last


def _token_at(prompt: list[int], output: list[int], position: int) -> int:
    """Token `position` of `prompt + output`, without building the concatenation."""
    return prompt[position] if position < len(prompt) else output[position - len(prompt)]
