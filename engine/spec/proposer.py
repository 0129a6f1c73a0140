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
from engine.spec.ngram import propose_ngram


class Proposer(Protocol):
    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]: ...

    def forget(self, request_ids: Sequence[str]) -> None: ...

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None: ...


class NgramProposer:
    """Prompt lookup over each row's own tokens (engine.spec.ngram); stateless."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.min_n = config.prompt_lookup_min
        self.max_n = config.prompt_lookup_max

    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]:
        return [
            propose_ngram(
                s.prompt_token_ids + s.output_token_ids, s.num_lookahead, self.min_n, self.max_n
            )
            for s in rows
        ]

    def forget(self, request_ids: Sequence[str]) -> None:
        pass

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None:
        pass
