"""The batched sampler: one step's logits [B, V] in, one token (and maybe logprobs) per row out.

Order of processing (every stage batched on the logits' device; Python loops run over rows
only, to build small per-row tensors and to draw seeded noise):
1. Padded vocabulary: columns >= `vocab_size` are dropped (sliced off), so they are never
   chosen and never counted in logprobs.
2. logit_bias: each row's (token, bias) pairs are added to its raw logits
   (see `engine.sampling.bias`).
3. Grammar: rows with structured output get xgrammar's token bitmask, disallowed tokens at
   -inf, so greedy and sampled rows alike obey it; a finished grammar allows only the stop
   tokens, so the request ends with "stop" (see `engine.sampling.grammar_mask`).
4. min_tokens: while `len(output_token_ids) < min_tokens`, EOS ids (the model's, unless
   `ignore_eos`) and `stop_token_ids` are set to -inf.
5. Penalties: repetition (Hugging Face: seen in prompt or output -> logit / p if > 0 else
   logit * p), then presence and frequency (OpenAI: output tokens only,
   `logit -= presence * [count > 0] + frequency * count`).
6. Logprobs, for rows that ask: `log_softmax` of the logits after 1-5, before temperature and
   truncation; the sampled token's logprob and the top-N sorted descending.
7. Greedy rows (temperature 0): argmax.
8. Other rows: divide by temperature, then top-k, top-p, min-p (see `engine.sampling.truncation`),
   then the exponential race argmax(probs / E), E ~ Exp(1) (see `engine.sampling.noise`).
   Seeded rows are reproducible whatever shares the batch.
All arithmetic is float32 whatever the logits' dtype. Fast path: when every row is greedy with
no penalties, no pending min_tokens, no logprobs, no logit_bias and no grammar, the result is
one argmax.
Hazard: a row whose every token is forbidden (a vocabulary made only of EOS / stop ids while
min_tokens is pending, or a complete grammar, which allows only stop tokens, while min_tokens
is pending) has no valid choice; it gets an arbitrary id (for a grammar row the engine then
fails the request: the token breaks the grammar).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.device_sync import mark_current, wait_current
from engine.sampling.batch import SamplingBatch, needs_full_path
from engine.sampling.bias import apply_logit_bias
from engine.sampling.grammar_mask import GrammarMask
from engine.sampling.logprobs import gather_logprobs
from engine.sampling.noise import exponential_noise
from engine.sampling.penalties import apply_min_tokens, apply_penalties
from engine.sampling.seeds import step_seed
from engine.sampling.truncation import truncate
from engine.scheduler.output import ScheduledRequest, TokenLogprobs


@dataclass(frozen=True)
class SamplerResult:
    """`token_ids[i]` and `logprobs[i]` belong to row i; logprobs are None where not requested."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class SampledTokens:
    """One step's sampled ids: `ids` [S] int64 on the device (the next step may feed them
    from there, overlap scheduling) and a copy on its way to the host, which `result()` waits
    for with the GIL released (an event, as `engine.device_sync.to_host`)."""

    def __init__(self, ids: torch.Tensor, logprobs: list[TokenLogprobs | None]) -> None:
        self.ids = ids
        self.logprobs = logprobs
        self._host = ids
        self._copied: torch.cuda.Event | None = None
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._copied = mark_current(ids.device)

    def wait_device(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()

    def result(self) -> SamplerResult:
        self.wait_device()
        return SamplerResult(self._host.tolist(), self.logprobs)


class Sampler:
    """Picks the next token of every row of a step.

    `device` is where the runner keeps logits; computation always follows `logits.device`.
    Stateless between calls: everything a row needs comes from its ScheduledRequest (the
    grammar stage keeps only a reused bitmask buffer and its fill time, `grammar_mask`).
    """

    def __init__(
        self, vocab_size: int, eos_token_ids: tuple[int, ...], device: torch.device
    ) -> None:
        assert vocab_size > 0, "vocab_size must be positive"
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device
        self.grammar_mask = GrammarMask(vocab_size)

    def __call__(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> SamplerResult:
        return self.launch(logits, requests).result()

    def launch(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> SampledTokens:
        """Enqueue the sampling of every row; only rows that ask for logprobs wait for the
        device here."""
        assert logits.dim() == 2 and logits.shape[0] == len(requests), (
            f"logits {tuple(logits.shape)} do not match {len(requests)} requests"
        )
        assert logits.shape[1] >= self.vocab_size, "logits narrower than the vocabulary"
        if not any(needs_full_path(r) for r in requests):
            return SampledTokens(
                logits[:, : self.vocab_size].argmax(dim=-1), [None] * len(requests)
            )
        logits = self.process(logits, requests)
        token_ids = self._pick(logits, requests)
        if any(r.sampling_params.logprobs is not None for r in requests):
            wait_current(logits.device)  # the logprobs' reads would hold the GIL meanwhile
        logprobs = gather_logprobs(
            logits, token_ids, [r.sampling_params.logprobs for r in requests]
        )
        return SampledTokens(token_ids, logprobs)

    def process(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Stages 1-5 on a float32 copy: [B, vocab_size], what logprobs and the pick read."""
        logits = logits[:, : self.vocab_size].to(torch.float32, copy=True)
        apply_logit_bias(logits, requests)
        self.grammar_mask.apply(logits, requests)
        apply_min_tokens(logits, requests, self.eos_token_ids)
        apply_penalties(logits, requests)
        return logits

    def _pick(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """[B] int64 on the device: argmax everywhere, then sampled rows overwritten."""
        token_ids = logits.argmax(dim=-1)
        sampled_rows = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if not sampled_rows:
            return token_ids
        rows = torch.tensor(sampled_rows, dtype=torch.int64).to(logits.device)
        chosen = [requests[i] for i in sampled_rows]
        probs = self.probs(logits[rows], chosen)
        token_ids[rows] = (probs / self.noise(chosen, logits.device)).argmax(dim=-1)
        return token_ids

    def probs(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> torch.Tensor:
        """The distribution R sampled rows draw from: temperature, truncation, softmax."""
        params = [r.sampling_params for r in requests]
        batch = SamplingBatch.from_params(params, self.vocab_size, logits.device)
        scaled = truncate(logits / batch.temperature.unsqueeze(1), batch)
        return torch.softmax(scaled, dim=-1)

    def noise(self, requests: Sequence[ScheduledRequest], device: torch.device) -> torch.Tensor:
        """The race's Exp(1) noise [R, V]; a seeded row's depends on its seed and its number
        of output tokens only (`step_seed`)."""
        seeds = [
            None
            if r.sampling_params.seed is None
            else step_seed(r.sampling_params.seed, len(r.output_token_ids))
            for r in requests
        ]
        return exponential_noise(seeds, self.vocab_size, device)
