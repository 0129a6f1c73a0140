"""Goodput and the configuration search.

Goodput (DistServe): the highest request rate at which at least `slo.attainment` of requests
meet both the TTFT and the TPOT target. `max_rate` finds it by doubling then bisecting, each
probe one simulation of a fresh Poisson trace at that rate (same seed), stopped early once
enough requests missed for certain.

The search, for a GPU budget and each TP size of the profile:
  1. per-worker phase goodputs: a prefill worker alone against the TTFT target, a decode
     worker alone against the TPOT target, a colocated worker against both (one worker each:
     the cost of the search does not grow with the budget);
  2. composition (DistServe's replication): every P x TP_p + D x TP_d <= budget scores
     min(P * g_prefill, D * g_decode); colocated scores floor(budget / TP) * g_colocated;
  3. validation: the best candidates of each kind are simulated whole, with the real router
     between the pools, on the budget itself or, above `max_cell_gpus`, on a cell of the same
     ratio (predicted goodput = the cell's per GPU x the budget). The validated figure decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tandem.plan.cluster import ClusterConfig, SloTargets
from tandem.plan.profile import CostProfile
from tandem.plan.simulator import Phase, SimResult, SimSettings, simulate
from tandem.plan.workload import Workload, trace

MIN_REQUESTS = 20
ROUTER_LOAD = 0.95  # the router's utilisation at which its queue still adds only milliseconds


@dataclass(frozen=True)
class SearchSettings:
    duration_s: float = 20.0  # of each probe's trace
    seed: int = 0
    bisect_steps: int = 6
    max_cell_gpus: int = 8
    top_k: int = 2  # disaggregated candidates validated
    curve_points: int = 6  # rates on each attainment curve
    sim: SimSettings = SimSettings()


@dataclass(frozen=True)
class Candidate:
    config: ClusterConfig
    estimate: float  # req/s of the whole config, from phase goodputs
    goodput: float | None = None  # req/s, validated by a whole simulation
    note: str = ""

    @property
    def score(self) -> float:
        return self.estimate if self.goodput is None else self.goodput

    def per_gpu(self) -> float:
        return self.score / self.config.num_gpus


@dataclass
class PlanResult:
    budget: int
    best: Candidate
    best_disaggregated: Candidate | None
    best_colocated: Candidate | None
    candidates: list[Candidate]
    phase_goodput: dict[str, float]
    reason: str
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    num_simulations: int = 0
    simulated_requests: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # process CPU time: what the wall time would be on an idle machine


class Prober:
    """Runs probes and counts them (for the report's simulated requests per second)."""

    def __init__(
        self, profile: CostProfile, slo: SloTargets, workload: Workload, settings: SearchSettings
    ) -> None:
        self.profile, self.slo, self.workload, self.settings = profile, slo, workload, settings
        self.num_simulations = 0
        self.simulated_requests = 0
        self.wall_s = 0.0

    def run(
        self, config: ClusterConfig, rate: float, phase: Phase = Phase.BOTH, early: bool = True
    ) -> SimResult:
        # at least ~MIN_REQUESTS arrivals, so a trickle of load is judged on requests, not on none
        duration = max(self.settings.duration_s, MIN_REQUESTS / rate)
        arrivals = trace(self.workload, rate, duration, self.settings.seed)
        allowed = math.floor((1 - self.slo.attainment) * len(arrivals)) if early else None
        result = simulate(
            self.profile, config, self.slo, arrivals, rate, self.settings.sim, allowed, phase
        )
        self.num_simulations += 1
        self.simulated_requests += len(arrivals)
        self.wall_s += result.wall_s
        return result

    def meets(self, config: ClusterConfig, rate: float, phase: Phase = Phase.BOTH) -> bool:
        result = self.run(config, rate, phase)
        ok = result.attainment(self.slo) >= self.slo.attainment
        return bool(result.records) and not result.stopped_early and ok

    def max_rate(self, config: ClusterConfig, start: float, phase: Phase = Phase.BOTH) -> float:
        """Goodput of `config` in req/s (0.0 when even a trickle misses)."""
        return max_rate(lambda r: self.meets(config, r, phase), start, self.settings.bisect_steps)


def max_rate(
    meets: Callable[[float], bool], start: float, bisect_steps: int, floor: float = 1e-3
) -> float:
    """The highest rate `meets` accepts, to within 4% or 2**-bisect_steps of the bracket."""
    lo, hi = 0.0, start
    while meets(hi):
        lo, hi = hi, hi * 2
    while lo == 0.0 and hi > floor:
        hi /= 4
        if meets(hi):
            lo, hi = hi, hi * 4
            break
    if lo == 0.0:
        return 0.0
    for _ in range(bisect_steps):
        if hi - lo <= 0.04 * lo:  # within 4%: finer than the trace's own noise
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo


def _start_rate(profile: CostProfile, tp: int, workload: Workload) -> float:
    """A first probe near one worker's capacity: prompt tokens/s over the mean prompt."""
    mean_prompt, _ = workload.mean()
    costs = profile.costs(tp)
    return max(0.05, 0.3 / max(costs.prefill_seconds(int(mean_prompt)), 1e-6))


def phase_goodputs(prober: Prober, tps: Sequence[int], base: ClusterConfig) -> dict[str, float]:
    """Per-worker goodput of each phase and TP size: keys like 'prefill/1' (req/s). `base`
    gives the link and engine limits."""
    out: dict[str, float] = {}
    for tp in tps:
        start = _start_rate(prober.profile, tp, prober.workload)
        prefill = replace(base, num_prefill=1, prefill_tp=tp, num_decode=0, num_colocated=0)
        decode = replace(base, num_prefill=0, num_decode=1, decode_tp=tp, num_colocated=0)
        colocated = replace(base, num_prefill=0, num_decode=0, num_colocated=1, colocated_tp=tp)
        out[f"prefill/{tp}"] = prober.max_rate(prefill, start, Phase.PREFILL)
        out[f"decode/{tp}"] = prober.max_rate(decode, start, Phase.DECODE)
        out[f"colocated/{tp}"] = prober.max_rate(colocated, start)
    return out


def compose(
    budget: int, tps: Sequence[int], goodput: dict[str, float], base: ClusterConfig
) -> list[Candidate]:
    """Every config that fits `budget`, scored from per-worker phase goodputs, best first."""
    found: list[Candidate] = []
    for tp_p in tps:
        for tp_d in tps:
            g_p, g_d = goodput[f"prefill/{tp_p}"], goodput[f"decode/{tp_d}"]
            for p in range(1, (budget - tp_d) // tp_p + 1):
                d = (budget - p * tp_p) // tp_d
                if d < 1:
                    continue
                cfg = replace(
                    base,
                    num_prefill=p,
                    prefill_tp=tp_p,
                    num_decode=d,
                    decode_tp=tp_d,
                    num_colocated=0,
                )
                found.append(Candidate(cfg, min(p * g_p, d * g_d)))
    for tp in tps:
        n = budget // tp
        if n >= 1:
            cfg = replace(base, num_prefill=0, num_decode=0, num_colocated=n, colocated_tp=tp)
            found.append(Candidate(cfg, n * goodput[f"colocated/{tp}"]))
    return sorted(found, key=lambda c: (-c.estimate, c.config.num_gpus))


def cell_of(config: ClusterConfig, max_gpus: int) -> ClusterConfig:
    """The same pools scaled down to at most `max_gpus` (at least one worker of each)."""
    if config.num_gpus <= max_gpus:
        return config
    k = config.num_gpus / max_gpus
    if config.colocated:
        return replace(config, num_colocated=max(1, int(config.num_colocated / k)))
    p = max(1, round(config.num_prefill / k))
    d = max(1, round(config.num_decode / k))
    while p * config.prefill_tp + d * config.decode_tp > max_gpus and (p > 1 or d > 1):
        p, d = (
            (p - 1, d)
            if p * config.num_decode > d * config.num_prefill and p > 1
            else (p, max(1, d - 1))
        )
    return replace(config, num_prefill=p, num_decode=d)


def validate(prober: Prober, candidate: Candidate) -> Candidate:
    """Simulate the whole path (on a cell above `max_cell_gpus`): the goodput that decides."""
    cell = cell_of(candidate.config, prober.settings.max_cell_gpus)
    start = max(candidate.estimate * cell.num_gpus / candidate.config.num_gpus, 0.05)
    cell_rate = prober.max_rate(cell, start)
    goodput = cell_rate * candidate.config.num_gpus / cell.num_gpus
    note = "simulated" if cell == candidate.config else f"simulated on a cell: {cell.describe()}"
    router_s = prober.profile.router_s_per_request
    if cell != candidate.config and router_s > 0 and goodput > ROUTER_LOAD / router_s:
        # the cell's router saw the cell's rate only; the whole cluster has one router
        goodput, note = ROUTER_LOAD / router_s, note + ", capped by the one router"
    return replace(candidate, goodput=goodput, note=note)


def attainment_curve(
    prober: Prober, config: ClusterConfig, goodput: float
) -> list[tuple[float, float]]:
    """(rate per GPU, attainment) around `goodput` (req/s of `config`), on its cell."""
    cell = cell_of(config, prober.settings.max_cell_gpus)
    top = max(goodput * cell.num_gpus / config.num_gpus, 0.1) * 1.6
    curve, points = [], prober.settings.curve_points
    for i in range(1, points + 1):
        rate = top * i / points
        result = prober.run(cell, rate, early=False)
        curve.append((rate / cell.num_gpus, result.attainment(prober.slo)))
    return curve
