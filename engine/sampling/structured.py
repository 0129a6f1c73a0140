"""The engine's structured-output bookkeeping: its grammar compiler and its live grammar requests.

`LLMEngine` owns one. Contract, in engine-thread calls:
- `check(params)` on add (raises InvalidRequestError("structured", ...); nothing allocated);
- `attach(request)` gives a new request its PENDING GrammarState (compiling in background);
- `track(request)` once the request is the engine's (queued, or prefilled elsewhere);
- `failed()` lists tracked requests whose grammar FAILED, for the engine to finish with an error;
- `forget(request_id)` when the engine forgets the request; `drop(request)` also frees the
  state of one that never reached the scheduler (whose finish paths free the rest);
- `wait_for_compiles()` blocks briefly (GIL released) when a step had nothing to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine.errors import InvalidRequestError
from engine.request import Request
from engine.sampling.grammar import GrammarCompiler, GrammarStatus, wait_any
from engine.sampling_params import SamplingParams

_WAIT_S = 0.005  # an idle step waits this long for a compilation instead of spinning


class StructuredOutputs:
    """`compiler` is None for a model without a tokenizer until `use_vocab()`."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, stop_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self.stop_ids = tuple(stop_ids)
        self.compiler: GrammarCompiler | None = None
        if tokenizer is not None:
            self.compiler = GrammarCompiler.from_tokenizer(tokenizer, vocab_size, self.stop_ids)
        self._live: dict[str, Request] = {}

    def use_vocab(self, vocab: Sequence[bytes]) -> None:
        """Compile against an explicit vocabulary (`vocab[i]`: token i's bytes) instead."""
        if self.compiler is not None:
            self.compiler.shutdown()
        self.compiler = GrammarCompiler.from_vocab(vocab, self.vocab_size, self.stop_ids)

    def check(self, params: SamplingParams) -> None:
        if params.structured is None:
            return
        if self.compiler is None:
            raise InvalidRequestError(
                "structured", "this model has no tokenizer; structured output needs one"
            )
        self.compiler.check(params.structured)

    def attach(self, request: Request) -> None:
        structured = request.sampling_params.structured
        if structured is not None:
            assert self.compiler is not None, "check() refuses structured output without one"
            request.grammar = self.compiler.state(structured)

    def track(self, request: Request) -> None:
        if request.grammar is not None:
            self._live[request.request_id] = request

    def forget(self, request_id: str) -> None:
        self._live.pop(request_id, None)

    def drop(self, request: Request) -> None:
        """Forget a request that will never run, freeing its grammar state."""
        self.forget(request.request_id)
        if request.grammar is not None:
            request.grammar.free()

    def failed(self) -> list[Request]:
        return [
            r
            for r in self._live.values()
            if r.grammar is not None and r.grammar.status is GrammarStatus.FAILED
        ]

    def wait_for_compiles(self) -> None:
        if self._live:
            wait_any([r.grammar for r in self._live.values() if r.grammar is not None], _WAIT_S)

    @property
    def num_live(self) -> int:
        return len(self._live)

    def shutdown(self) -> None:
        if self.compiler is not None:
            self.compiler.shutdown()
