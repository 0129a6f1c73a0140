"""What the scheduler hands the runner each step, and what comes back.

Plain frozen dataclasses: the runner reads them and never mutates scheduler state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # never at run time: the router imports this module and must not load xgrammar
    from engine.sampling.grammar import GrammarState


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step.

    `token_ids` are fed at positions `start_position ... start_position + len(token_ids) - 1`
    (a prompt chunk, a recompute after preemption, or the one last sampled token in decode).
    `block_ids` is the request's whole block table after this step's allocation; the slots for
    the new tokens are already allocated. `sample` is True when this step completes every
    known token, so its last position produces a new token (the final prefill chunk, or decode).
    `prompt_token_ids` / `output_token_ids` are references the sampler reads for penalties and
    seeded noise; they must not be mutated until `update()`. `grammar` is the request's
    structured-output state (None without one): only the sampler on rank 0 touches it.

    Speculative decoding: `num_lookahead` slots after `token_ids` are allocated for draft
    tokens (a decode row only). The runner asks its proposer for up to that many drafts and
    verifies them in a view of this row whose `token_ids` end with the `num_draft_tokens`
    drafts (the scheduler's own rows always have `num_draft_tokens == 0`).

    Overlap scheduling: with `input_pending` the last of `token_ids` is a placeholder (0) for
    the token this request sampled in the previous step, which is still in device memory; the
    runner fills it in on the device before the forward pass.
    """

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    sample: bool
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    grammar: GrammarState | None = None
    num_lookahead: int = 0
    num_draft_tokens: int = 0
    input_pending: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def draft_token_ids(self) -> list[int]:
        """The drafts at the end of `token_ids` (a verify view's row; [] otherwise)."""
        return self.token_ids[len(self.token_ids) - self.num_draft_tokens :]

    @property
    def seq_len(self) -> int:
        """Context length once this step's tokens are in the cache."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """A step: the requests to run (prefill chunks first, then decodes) and what changed.

    `finished_ids`: requests that left the running batch since the previous step (finished,
    aborted or preempted), so a runner holding per-request state (a draft model's) drops it.
    `num_batched_tokens` counts the lookahead slots too."""

    scheduled: list[ScheduledRequest]
    preempted_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0
    finished_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def decode_only(self) -> bool:
        """Every request feeds exactly one token (CUDA-graph eligible)."""
        return all(s.num_tokens == 1 and s.sample for s in self.scheduled)

    @property
    def any_lookahead(self) -> bool:
        return any(s.num_lookahead for s in self.scheduled)


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the top-N alternatives (id, logprob)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class RunnerOutput:
    """New tokens for each request whose ScheduledRequest had `sample=True`, by request id.

    With speculation a request gets `accepted_draft_ids[rid]` (its accepted drafts, in order)
    followed by `sampled_token_ids[rid]` (the target's own next token after them), out of
    `num_draft_tokens[rid]` drafts verified; `draft_logprobs[rid]` holds the accepted drafts'
    logprobs where asked, `logprobs[rid]` the last token's."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    accepted_draft_ids: dict[str, list[int]] = field(default_factory=dict)
    num_draft_tokens: dict[str, int] = field(default_factory=dict)
    draft_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)

    def new_token_ids(self, request_id: str) -> list[int]:
        """Every token the step gives the request, in order."""
        return [*self.accepted_draft_ids.get(request_id, ()), self.sampled_token_ids[request_id]]
