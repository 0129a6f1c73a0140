"""A request's state inside one engine: what the scheduler owns and the runner only reads."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.kv.block_hash import BlockHash
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.sampling.grammar import GrammarState


class RequestStatus(enum.Enum):
    """WAITING -> RUNNING -> FINISHED_*; RUNNING -> PREEMPTED -> RUNNING (recompute).

    Every exit to a FINISHED_* state frees the request's blocks and its grammar state (the
    scheduler's job).
    """

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token, EOS or a stop string
    LENGTH = "length"  # max_tokens or the context is full
    ABORT = "abort"  # aborted by the caller, or failed

    @staticmethod
    def of(status: RequestStatus) -> FinishReason | None:
        return {
            RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
            RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
            RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
        }.get(status)


@dataclass(eq=False)
class Request:
    """One sequence. Token ids are prompt + outputs; `num_computed_tokens` of them have KV."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # lower value is served first
    deadline: float | None = None  # absolute time.monotonic() seconds; earlier is served first
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full blocks, grows lazily
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token or string that finished it
    # Disaggregation: a prefill-only request keeps its blocks when it finishes (stopped or
    # length, never aborted); they move to `held_block_ids` for a KV lease, and the holder
    # frees them with KVManager.release().
    hold_kv: bool = False
    held_block_ids: list[int] = field(default_factory=list)
    first_scheduled_time: float | None = None
    num_swapped_tokens: int = 0  # preempted with this many tokens' KV swapped out, not dropped
    # Structured output: the matcher state (engine.sampling.grammar); not schedulable while it
    # compiles; freed on every exit to FINISHED_* (the scheduler's) or when dropped (the engine's).
    grammar: GrammarState | None = None
    error: str | None = None  # why a request failed (finished aborted by the engine)
    # Speculative decoding: this request's own draft length (engine.spec.lookahead adapts it;
    # 0 until its first decode step) and its totals of drafts verified and accepted.
    spec_k: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_new_tokens: int = 0  # output tokens the latest update() appended (more with speculation)
    # Overlap scheduling: tokens sampled by a launched step and not yet on the host (0 or 1).
    # The scheduler counts them (the next step feeds the newest from device memory) but they
    # are not in `output_token_ids` until `Scheduler.complete()` appends them.
    num_pending_tokens: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def grammar_ready(self) -> bool:
        """False while its grammar compiles (or failed): the scheduler passes it over."""
        return self.grammar is None or self.grammar.ready

    @property
    def finish_reason(self) -> FinishReason | None:
        return FinishReason.of(self.status)
