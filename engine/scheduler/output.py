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

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length once this step's tokens are in the cache."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    """A step: the requests to run (prefill chunks first, then decodes) and what changed."""

    scheduled: list[ScheduledRequest]
    preempted_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def decode_only(self) -> bool:
        """Every request feeds exactly one token (CUDA-graph eligible)."""
        return all(s.num_tokens == 1 and s.sample for s in self.scheduled)


@dataclass(frozen=True)
class TokenLogprobs:
    """The sampled token's log-probability and the top-N alternatives (id, logprob)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class RunnerOutput:
    """New tokens for each request whose ScheduledRequest had `sample=True`, by request id."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
