"""AsyncEngine: an LLMEngine behind an EngineLoop, usable from asyncio code (the pool actors).

Requests go in with `add` (validated on the loop thread; errors reach the caller); every
engine output goes to `on_output(output)`, called on the loop thread. Callers that need
asyncio wake-ups hop with `loop.call_soon_threadsafe`. Also: the worker's load snapshot and a
cost model calibrated at start by timing real prefill and decode steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.engine import LLMEngine
from engine.loop import EngineLoop
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

T = TypeVar("T")


@dataclass(frozen=True)
class Calibration:
    """Seconds: prefill(n) = prefill_s + prefill_s_per_token * n;
    decode_step(batch, ctx) = step_s + step_s_per_seq * batch + step_s_per_ctx_token * ctx."""

    prefill_s: float
    prefill_s_per_token: float
    step_s: float
    step_s_per_seq: float
    step_s_per_ctx_token: float


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares line (intercept, slope), slope >= 0."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return max(0.0, my - slope * mx), slope


def _time_requests(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[float]:
    """Wall time of each engine step until these requests finish."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"__calibrate-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def calibrate(engine: LLMEngine) -> Calibration:
    """Time a few real steps (run before the loop starts). Small sizes: it costs seconds."""
    limit = min(engine.max_model_len - 8, engine.config.max_num_batched_tokens)
    sizes = [n for n in (16, 64, 256) if n <= limit] or [max(1, limit)]
    _time_requests(engine, [[1] * sizes[0]], 1)  # warm up
    prefill = [min(_time_requests(engine, [[1] * n], 1)) for n in sizes]
    pre_a, pre_b = _fit([float(n) for n in sizes], prefill)
    batches = [b for b in (1, 4, 8) if b <= engine.config.max_num_seqs]
    step = []
    for b in batches:
        times = _time_requests(engine, [[1] * 16] * b, 6)
        step.append(sorted(times[1:])[len(times[1:]) // 2])
    dec_a, dec_b = _fit([float(b) for b in batches], step)
    return Calibration(pre_a, pre_b, dec_a, dec_b, 0.0)


class AsyncEngine:
    def __init__(
        self,
        engine: LLMEngine,
        on_output: Callable[[RequestOutput], None],
        before_step: Callable[[], None] | None = None,
        has_work: Callable[[], bool] | None = None,
        calibrate_at_start: bool = True,
    ) -> None:
        self.engine = engine
        self.calibration = calibrate(engine) if calibrate_at_start else Calibration(0, 0, 0, 0, 0)
        self._on_output = on_output
        self.loop = EngineLoop(engine, self._dispatch, before_step, has_work)

    def start(self) -> None:
        """Start the loop thread (after whatever `before_step` touches exists)."""
        self.loop.start()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._on_output(out)

    async def run(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the loop thread and await its result."""
        return await asyncio.wrap_future(self.loop.call(fn))

    @property
    def healthy(self) -> bool:
        return self.loop.healthy

    def shutdown(self) -> None:
        self.loop.stop()


def now() -> float:
    return time.monotonic()


__all__ = ["AsyncEngine", "Calibration", "calibrate", "now", "Any"]
