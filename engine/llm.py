"""The offline API: `LLM(model, ...).generate(prompts, params)`.

Lifetime: an LLM holds its engine's model and KV cache, and at `tensor_parallel_size > 1` its
follower actors, process groups and watchdog thread. `close()` releases all of it (so does
leaving a `with LLM(...) as llm:` block, and so does garbage collection of an LLM nobody
closed), after which another LLM, TP group included, can start in this process.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self, cast

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.errors import TandemError
from engine.outputs import RequestOutput
from engine.progress import progress_bar
from engine.sampling_params import SamplingParams
from engine.tokenizer import apply_chat_template

Prompt = str | Sequence[int]


class LLMClosedError(TandemError, RuntimeError):
    """The LLM was closed: it holds no model any more."""


class LLM:
    """An engine in this process. `model` is a checkpoint directory or a built-in model's name
    (engine.demo_model).

    `tensor_parallel_size=N > 1` makes this process rank 0 of a TP group whose other ranks are
    local Ray actors (Ray starts locally if this process has not joined a cluster; it stays up
    after close). Use it as a context manager or call `close()`; see the module docstring."""

    def __init__(self, model: str, show_progress: bool = True, **engine_kwargs: Any) -> None:
        self.show_progress = show_progress
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs), show_progress)
        self._counter = 0
        # Refers to the engine, never to self: a finalizer holding self would keep it alive.
        self._finalizer = weakref.finalize(self, self.engine.shutdown)

    def close(self) -> None:
        """Release the engine: TP followers stopped and their processes exited, process
        groups destroyed, threads ended, model and KV cache memory given back. Idempotent;
        generate() afterwards raises LLMClosedError."""
        self._finalizer()

    def shutdown(self) -> None:
        """Alias of close()."""
        self.close()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _params_for(
        self, n: int, params: SamplingParams | Sequence[SamplingParams] | None
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        if len(params) != n:
            raise ValueError(f"params: {len(params)} sampling params for {n} prompts")
        return list(params)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One finished output per prompt (n per prompt when `params.n > 1`), in prompt order.

        Every prompt is validated before any runs: a bad one raises InvalidRequestError naming
        the field and nothing is queued."""
        if self.closed:
            raise LLMClosedError("this LLM is closed; create a new one")
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        batch: list[Prompt] = (
            [cast(Prompt, prompts)] if single else list(cast(Sequence[Prompt], prompts))
        )
        all_params = self._params_for(len(batch), params)
        prepared = [(self.engine.tokenize(p), sp) for p, sp in zip(batch, all_params)]
        for ids, sp in prepared:
            self.engine.validate(ids, sp)
        order: list[str] = []
        for ids, sp in prepared:
            for i in range(sp.n):
                order.append(self._submit(ids, _nth(sp, i)))
        return self._run(order)

    def chat(
        self, messages: list[dict[str, str]], params: SamplingParams | None = None
    ) -> RequestOutput:
        ids = apply_chat_template(self.engine.tokenizer, messages)
        return self.generate([ids], params)[0]

    def _submit(self, ids: list[int], sp: SamplingParams) -> str:
        request_id = str(self._counter)
        self._counter += 1
        self.engine.add_request(request_id, ids, sp)
        return request_id

    def _run(self, order: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with progress_bar(self.show_progress) as progress:
            task = progress.add_task("generating", total=len(order))
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        progress.advance(task)
        return [finished[rid] for rid in order]


def _nth(params: SamplingParams, i: int) -> SamplingParams:
    """The i-th of n samples: one request each, seeds spread so they differ."""
    from dataclasses import replace

    seed = None if params.seed is None else params.seed + i
    return replace(params, n=1, seed=seed)
