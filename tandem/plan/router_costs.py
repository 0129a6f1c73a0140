"""The CostModel a simulated worker reports to the router: what production calibration measures.

A real worker times a few steps at start (`engine.async_engine.calibrate`): prefills of 16, 64
and 256 tokens and decode steps of batch 1, 4 and 8 over 16-token prompts, each fitted to a
line; it reports no context term. The simulated worker reports the same fit of its profile's
costs at those points, so the simulated router mispredicts exactly as the real one would
(long prompts' attention and long contexts are invisible to it). Pure.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.contract.worker_api import CostModel
from tandem.plan.profile import CostProfile, StepCosts

CALIBRATION_PREFILL_TOKENS = (16, 64, 256)
CALIBRATION_BATCHES = (1, 4, 8)
CALIBRATION_PROMPT = 16


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope), both clamped >= 0 (as the engine's calibration)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = max(0.0, cov / var) if var else 0.0
    return max(0.0, my - slope * mx), slope


def router_cost_model(costs: StepCosts, profile: CostProfile, link: str) -> CostModel:
    """What a worker with `costs` would report after the production calibration."""
    sizes = [float(n) for n in CALIBRATION_PREFILL_TOKENS]
    pre_a, pre_b = fit_line(sizes, [costs.prefill_seconds(int(n)) for n in sizes])
    batches = [float(b) for b in CALIBRATION_BATCHES]
    steps = [costs.decode_seconds(int(b), int(b) * (CALIBRATION_PROMPT + 3)) for b in batches]
    dec_a, dec_b = fit_line(batches, steps)
    return CostModel(
        prefill_s_per_token=pre_b,
        prefill_s_per_request=pre_a,
        decode_step_s=dec_a,
        decode_step_s_per_seq=dec_b,
        decode_step_s_per_context_token=0.0,
        kv_bytes_per_token=profile.kv_bytes_per_token,
        transfer_s_per_byte=1.0 / profile.link(link).bytes_per_s,
    )
