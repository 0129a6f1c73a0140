"""Fit a profile's step costs from measured steps, and measure a real engine to get them.

`fit_step_costs` is pure (numpy least squares): prefill samples (new tokens, cached tokens,
seconds) fit `prefill_s + per_token * new + per_pair * new * (cached + new / 2)`; decode samples
(batch, total context, seconds) fit `decode_step_s + per_seq * batch + per_context * context`.
A coefficient the fit makes negative is dropped (set to 0) and the rest refitted.

`measure_engine(engine)` times real `LLMEngine.step()` calls (prefills of several lengths, some
behind a cached prefix; decode steps at several batches and contexts): a bench script on a GPU
host can call it (`bench/engine.py` measures the same engine) and `tandem plan calibrate` runs
it on this machine. `calibrate_engine` builds the engine itself; it imports torch, the rest of
the planner does not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tandem.plan.profile import CostProfile, Link, StepCosts


@dataclass(frozen=True)
class PrefillSample:
    num_new: int
    num_cached: int
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    context: int
    seconds: float


def _nonneg_fit(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares with every coefficient >= 0 (drop the negative ones, refit)."""
    keep = list(range(len(rows[0])))
    a, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    while True:
        coef, *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
        if (coef >= 0).all() or len(keep) == 1:
            out = [0.0] * a.shape[1]
            for i, c in zip(keep, coef):
                out[i] = max(0.0, float(c))
            return out
        keep.pop(int(np.argmin(coef)))


def fit_step_costs(
    prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample], kv_capacity_tokens: int
) -> StepCosts:
    """Step costs from measurements (module docstring). Needs >= 3 samples of each kind."""
    assert len(prefill) >= 3 and len(decode) >= 3, "need at least 3 samples of each kind"
    p = _nonneg_fit(
        [[1.0, s.num_new, s.num_new * (s.num_cached + s.num_new / 2)] for s in prefill],
        [s.seconds for s in prefill],
    )
    d = _nonneg_fit([[1.0, s.batch, s.context] for s in decode], [s.seconds for s in decode])
    return StepCosts(p[0], p[1], p[2], d[0], d[1], d[2], kv_capacity_tokens)


def _timed_steps(engine: Any, prompts: list[list[int]], max_tokens: int) -> list[float]:
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"cal-{time.monotonic_ns()}-{i}", prompt, params)
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times


def _prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 400 + 20 for i in range(n)]


def measure_engine(
    engine: Any,
    prompt_sizes: Sequence[int] = (16, 64, 128, 256, 512),
    batches: Sequence[int] = (1, 4, 8, 16),
    contexts: Sequence[int] = (16, 128, 384),
    repeats: int = 3,
) -> tuple[list[PrefillSample], list[DecodeSample]]:
    """Time a real engine's steps (the minimum of `repeats` for each size)."""
    _timed_steps(engine, [_prompt(0, 16)], 1)  # warm-up
    prefill, decode, seed = [], [], 1
    limit = engine.max_model_len - 8
    capacity = engine.kv_manager.num_usable_blocks * engine.kv_manager.block_size
    for n in [n for n in prompt_sizes if n <= limit]:
        best = min(_timed_steps(engine, [_prompt(seed + r, n)], 1)[0] for r in range(repeats))
        prefill.append(PrefillSample(n, 0, best))
        base = _prompt(seed + 100, n)  # cache n tokens, then prefill n more behind them
        if 2 * n <= limit:
            _timed_steps(engine, [base], 1)
            cached = engine.kv_manager.block_size * (n // engine.kv_manager.block_size)
            t = _timed_steps(engine, [base + _prompt(seed + 200, n)], 1)[0]
            prefill.append(PrefillSample(2 * n - cached, cached, t))
        seed += repeats + 300
    for ctx in [c for c in contexts if c + 16 <= limit]:
        for b in batches:
            if b * (ctx + 16) > capacity:
                continue
            # the last 5 of 8 steps decode only, however many steps the prompts' prefill took
            last = sorted(_timed_steps(engine, [_prompt(seed + i, ctx) for i in range(b)], 8)[-5:])
            decode.append(DecodeSample(b, b * (ctx + 5), last[2]))
            seed += b
    return prefill, decode


GPU_GRID = {
    "prompt_sizes": (128, 512, 1024, 2048, 4096),
    "batches": (1, 8, 32, 128, 256),
    "contexts": (128, 1024, 2048),
}


def calibrate_engine(
    model: str = "tiny-random",
    device: str = "cpu",
    max_model_len: int = 1024,
    load_format: str = "auto",
    dtype: str = "auto",
) -> CostProfile:
    """Measure a real engine on this machine (about a minute for the tiny model on CPU; on a
    GPU the larger `GPU_GRID`). `load_format="dummy"` times a shape without its weights."""

    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=model,
            device=device,
            max_model_len=max_model_len,
            load_format=load_format,
            dtype=dtype,
        ),
        show_progress=False,
    )
    try:
        grid: dict[str, Any] = GPU_GRID if device == "cuda" else {}
        prefill, decode = measure_engine(engine, **grid)
        capacity = engine.kv_manager.num_usable_blocks * engine.kv_manager.block_size
        costs = fit_step_costs(prefill, decode, capacity)
        kv_bytes = engine.kv_spec.bytes_per_token()
        block_size = engine.kv_manager.block_size
    finally:
        engine.shutdown()
    return CostProfile(
        name=f"{device}-{model}",
        gpu=device,
        model=model,
        kv_bytes_per_token=kv_bytes,
        max_model_len=max_model_len,
        tp={1: costs},
        links={"grpc": Link(0.002, 0.5e9), "fake": Link(0.0, 1e15)},
        block_size=block_size,
        router_s_per_request=1 / 631,
        sources={
            "tp.1": f"measured by `tandem plan calibrate` ({len(prefill)} prefill, {len(decode)} decode samples, tandem/plan/calibrate.py)",
            "links": "grpc: tandem/pool/core.py's 0.5 GB/s figure, 2 ms latency (not measured); fake: the in-process transport",
            "router_s_per_request": "1 / 631 requests/s measured on this machine (docs/BENCHMARKS.md 'HTTP front door')",
            "samples": repr(
                {
                    "prefill": [(s.num_new, s.num_cached, round(s.seconds, 5)) for s in prefill],
                    "decode": [(s.batch, s.context, round(s.seconds, 5)) for s in decode],
                }
            ),
        },
    )
