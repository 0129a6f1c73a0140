"""The sampler's grammar stage: each constrained row's matcher fills its row of a token bitmask,
then xgrammar sets the disallowed logits to -inf on the logits' device.

Per step, for the rows whose ScheduledRequest carries a GrammarState:
1. catch up: the matcher accepts the output tokens it has not seen (`GrammarState.catch_up`);
   a row whose token broke the grammar (FAILED) is left unconstrained this step, and the
   engine finishes that request with an error before the next schedule;
2. fill: live matchers fill their rows together (`xgr.BatchGrammarMatcher`, threads in C++);
   a terminated matcher's row allows only the stop tokens;
3. apply: `xgr.apply_token_bitmask_inplace` on the constrained rows only (CPU kernel on CPU,
   Triton on CUDA; the bitmask is copied to the device first).

The host bitmask is allocated once per batch-size high-water mark and reused (pinned when the
logits live on CUDA); so is its device copy. Hazard: the host buffer is refilled next step
while its copy to the device may still be in flight; this is safe only because the sampler
reads its tokens back (a stream sync) before the step ends.
`fill_seconds` accumulates the time spent in 1-2 (host work), for benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from engine.sampling.grammar import GrammarState, GrammarStatus
from engine.scheduler.output import ScheduledRequest


def _xgr() -> Any:
    import xgrammar

    return xgrammar


class GrammarMask:
    """Applies every grammar row's mask to a step's [B, vocab_size] logits, in place."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.fill_seconds = 0.0
        self._host: torch.Tensor | None = None
        self._device: torch.Tensor | None = None
        self._batch: Any = None  # xgr.BatchGrammarMatcher, built on first use

    def apply(self, logits: torch.Tensor, requests: Sequence[ScheduledRequest]) -> None:
        """No-op (and no xgrammar import) when no row carries a grammar."""
        rows = [i for i, r in enumerate(requests) if r.grammar is not None]
        if not rows:
            return
        started = time.perf_counter()
        bitmask = self._host_buffer(len(requests), logits.device)
        constrained = self._fill(bitmask, rows, requests)
        self.fill_seconds += time.perf_counter() - started
        if constrained:
            mask = self._to_device(bitmask, len(requests), logits.device)
            _xgr().apply_token_bitmask_inplace(
                logits, mask, vocab_size=self.vocab_size, indices=constrained
            )

    def _fill(
        self, bitmask: torch.Tensor, rows: list[int], requests: Sequence[ScheduledRequest]
    ) -> list[int]:
        """Catch every row's matcher up and fill its row; returns the rows to constrain."""
        live: list[int] = []
        constrained: list[int] = []
        for i in rows:
            state = requests[i].grammar
            assert state is not None
            assert state.status is not GrammarStatus.PENDING, "a compiling request was scheduled"
            if not state.catch_up(requests[i].output_token_ids):
                continue  # FAILED: unconstrained; the engine ends it before the next schedule
            constrained.append(i)
            if state.terminated:
                state.fill_stop_only(bitmask, i)
            else:
                live.append(i)
        if len(live) == 1:
            self._state(requests, live[0]).matcher.fill_next_token_bitmask(bitmask, live[0])
        elif live:
            matchers = [self._state(requests, i).matcher for i in live]
            self._batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask, live)
        return constrained

    @staticmethod
    def _state(requests: Sequence[ScheduledRequest], i: int) -> GrammarState:
        state = requests[i].grammar
        assert state is not None
        return state

    def _batch_matcher(self) -> Any:
        if self._batch is None:
            self._batch = _xgr().BatchGrammarMatcher()
        return self._batch

    def _host_buffer(self, num_rows: int, device: torch.device) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < num_rows:
            xgr = _xgr()
            shape = xgr.get_bitmask_shape(num_rows, self.vocab_size)
            pin = device.type == "cuda"
            self._host = torch.empty(shape, dtype=xgr.bitmask_dtype, pin_memory=pin)
        return self._host

    def _to_device(self, host: torch.Tensor, num_rows: int, device: torch.device) -> torch.Tensor:
        """The first `num_rows` rows of the host buffer, on `device` (the buffer itself on CPU)."""
        if device.type == "cpu":
            return host[:num_rows]
        if (
            self._device is None
            or self._device.device != device
            or self._device.shape != host.shape
        ):
            self._device = torch.empty(host.shape, dtype=host.dtype, device=device)
        out = self._device[:num_rows]
        out.copy_(host[:num_rows], non_blocking=True)
        return out
