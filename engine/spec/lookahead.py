"""How many draft tokens a decode row gets this step: the scheduler's speculation policy.

Pure (no torch). Three limits, smallest wins:
- the request's own k (`Request.spec_k`), adapted after every verification: all drafts
  accepted -> one more (up to the configured k); otherwise the accepted run plus one, so a
  request whose text the proposer cannot predict drifts down to one draft (dynamic
  speculation, after the "dynamic draft length" heuristics of TensorRT-LLM and vLLM);
- what the step can still use: the token budget, `max_model_len`, and `max_tokens` (drafts past
  the last token the request may produce are wasted);
- the batch: no speculation at all while more than `disable_by_batch_size` requests run, where
  verifying k + 1 positions per row costs more than the saved steps (the batch is compute
  bound there, not bound by reading the weights). Unset, the limit is where a verify step of
  every running row would feed more than `VERIFY_TOKENS_MAX` tokens: below that a step's
  linear layers stay bound by reading the weights (an H100's bf16 ridge point is ~300 FLOP
  per byte, i.e. ~150 tokens per step), so verifying k + 1 positions costs little more than
  decoding one; above it each extra position costs compute. This default is the roofline's
  argument, not yet a measurement (bench/spec_cost.py measures the real crossover).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import Request

VERIFY_TOKENS_MAX = 128


@dataclass(frozen=True)
class LookaheadPolicy:
    """`max_k` drafts at most; `disable_above` running requests switches speculation off."""

    max_k: int
    disable_above: int | None = None
    dynamic: bool = True

    def active(self, num_running: int) -> bool:
        if self.disable_above is not None:
            return num_running <= self.disable_above
        return num_running * (self.max_k + 1) <= VERIFY_TOKENS_MAX

    def lookahead(self, request: Request, budget_left: int, max_model_len: int) -> int:
        """Draft slots for `request`'s next decode step (0: none)."""
        k = request.spec_k or self.max_k
        room = max_model_len - request.num_tokens - 1
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            room = min(room, max_tokens - request.num_output_tokens - 1)
        return max(0, min(k, budget_left, room))

    def after_verify(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        """Record one verification and adapt the request's k."""
        request.num_draft_tokens += num_drafts
        request.num_accepted_tokens += num_accepted
        if not self.dynamic or num_drafts == 0:
            return  # no drafts (no n-gram match) says nothing about acceptance
        k = request.spec_k or self.max_k
        request.spec_k = min(self.max_k, k + 1) if num_accepted == num_drafts else num_accepted + 1
