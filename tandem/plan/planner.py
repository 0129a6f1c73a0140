"""`plan()`: the configuration to deploy for a workload, SLOs and a GPU budget, and why.

Runs `search` (phase goodputs, composition, whole-path validation), then answers "should I
disaggregate?" from the validated per-GPU goodputs and names the deciding reason: which
target colocated serving misses first beyond its goodput (TPOT: prefill steps stall the decode
batch; TTFT: prompts queue behind decode work), or, when colocated wins, which pool of the best
split is the bottleneck (pools come in whole workers; a colocated GPU idles in neither phase).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tandem.plan.cluster import ClusterConfig, SloTargets
from tandem.plan.errors import NoFeasibleConfigError, PlanError
from tandem.plan.profile import CostProfile
from tandem.plan.search import (
    Candidate,
    PlanResult,
    Prober,
    SearchSettings,
    attainment_curve,
    cell_of,
    compose,
    phase_goodputs,
    validate,
)
from tandem.plan.simulator import SimResult
from tandem.plan.workload import Workload

DEFAULT_SETTINGS = SearchSettings()
DEFAULT_BASE = ClusterConfig(num_colocated=1)  # the link and engine limits every config takes


def _check_inputs(profile: CostProfile, budget: int, tps: Sequence[int]) -> list[int]:
    for tp in tps:
        profile.costs(tp)  # raises PlanError naming tp
    fitting = [tp for tp in tps if tp <= budget]
    if budget < 1 or not fitting:
        raise PlanError(
            "gpus", f"a budget of {budget} GPU(s) is smaller than one worker (TP {min(tps)})"
        )
    return fitting


def miss_kinds(result: SimResult, slo: SloTargets) -> dict[str, int]:
    """How many requests missed TTFT, TPOT, or were never served (rejected or unfinished)."""
    kinds = {"ttft": 0, "tpot": 0, "unserved": 0}
    for r in result.records:
        ttft, tpot = r.ttft, r.tpot
        if ttft is None or tpot is None:
            kinds["unserved"] += 1
        else:
            kinds["ttft"] += ttft > slo.ttft_s
            kinds["tpot"] += tpot > slo.tpot_s
    return kinds


def _colocated_reason(prober: Prober, colocated: Candidate) -> str:
    cell = cell_of(colocated.config, prober.settings.max_cell_gpus)
    rate = max(colocated.score * cell.num_gpus / colocated.config.num_gpus, 0.05) * 1.25
    kinds = miss_kinds(prober.run(cell, rate, early=False), prober.slo)
    if kinds["tpot"] >= kinds["ttft"]:
        return (
            f"colocated serving misses TPOT first ({kinds['tpot']} TPOT vs {kinds['ttft']} TTFT "
            "misses at 1.25x its goodput): prefill chunks share its steps and stall the decode "
            "batch; separate pools keep decode steps short"
        )
    return (
        f"colocated serving misses TTFT first ({kinds['ttft']} TTFT vs {kinds['tpot']} TPOT "
        "misses at 1.25x its goodput): prompts wait behind decode steps; a prefill pool "
        "serves them without the decode batch in the way"
    )


def _split_reason(disagg: Candidate, phase: dict[str, float]) -> str:
    c = disagg.config
    cap_p = c.num_prefill * phase[f"prefill/{c.prefill_tp}"]
    cap_d = c.num_decode * phase[f"decode/{c.decode_tp}"]
    short = "prefill" if cap_p < cap_d else "decode"
    return (
        f"the best split ({c.describe()}) is bound by its {short} pool (prefill pool "
        f"{cap_p:.2f} req/s, decode pool {cap_d:.2f} req/s): pools come in whole workers and "
        "one pool idles part of the time, while a colocated GPU works on both phases"
    )


def _decide(
    prober: Prober, d: Candidate | None, c: Candidate | None, phase: dict[str, float]
) -> str:
    if d is None or c is None:
        kind = "colocated" if d is None else "disaggregated"
        return f"only {kind} configurations fit this budget"
    dg, cg = d.per_gpu(), c.per_gpu()
    if dg > cg:
        gain = f"+{(dg / cg - 1) * 100:.0f}%" if cg > 0 else "colocated meets nothing"
        return f"disaggregate: {dg:.3f} vs {cg:.3f} req/s per GPU ({gain}); " + _colocated_reason(
            prober, c
        )
    return f"do not disaggregate: colocated {cg:.3f} vs {dg:.3f} req/s per GPU; " + _split_reason(
        d, phase
    )


def _p90(xs: list[float]) -> float:
    return xs[int(0.9 * (len(xs) - 1))] if xs else float("inf")


def _closest(prober: Prober, candidates: list[Candidate]) -> str:
    """The candidate with the highest attainment at a trickle of load, and its figures."""
    rows = []
    for cand in candidates:
        cell = cell_of(cand.config, prober.settings.max_cell_gpus)
        result = prober.run(cell, 0.2 * cell.num_gpus / max(cell.num_gpus, 1), early=False)
        ttfts = sorted(r.ttft for r in result.records if r.ttft is not None)
        tpots = sorted(r.tpot for r in result.records if r.tpot is not None)
        rows.append((result.attainment(prober.slo), cand, _p90(ttfts), _p90(tpots)))
    att, cand, ttft, tpot = max(rows, key=lambda r: r[0])
    return (
        f"closest: {cand.config.describe()} meets {att:.0%} of requests at a trickle of load "
        f"(P90 TTFT {ttft * 1e3:.0f} ms vs {prober.slo.ttft_s * 1e3:.0f} ms, P90 TPOT "
        f"{tpot * 1e3:.1f} ms vs {prober.slo.tpot_s * 1e3:.1f} ms)"
    )


def _router_note(profile: CostProfile, best: Candidate) -> str:
    """A warning when the one router, not the GPUs, bounds the goodput."""
    if profile.router_s_per_request <= 0:
        return ""
    capacity = 1.0 / profile.router_s_per_request
    if best.score < 0.8 * capacity:
        return ""
    return (
        f"; the router is near its capacity ({capacity:.0f} req/s, the profile's "
        "router_s_per_request): more GPUs behind one router add little goodput"
    )


def plan(
    profile: CostProfile,
    workload: Workload,
    slo: SloTargets,
    budget: int,
    tps: Sequence[int],
    settings: SearchSettings = DEFAULT_SETTINGS,
    base: ClusterConfig = DEFAULT_BASE,
) -> PlanResult:
    """The best configuration within `budget` GPUs (module docstring). Raises PlanError for a
    budget below one worker or an unknown TP, NoFeasibleConfigError when nothing meets the SLOs."""
    started, cpu_started = time.perf_counter(), time.process_time()
    fitting = _check_inputs(profile, budget, tps)
    prober = Prober(profile, slo, workload, settings)
    phase = phase_goodputs(prober, fitting, base)
    candidates = compose(budget, fitting, phase, base)
    disagg = [c for c in candidates if not c.config.colocated][: settings.top_k]
    coloc = [c for c in candidates if c.config.colocated][:1]
    checked = [validate(prober, c) for c in disagg + coloc]
    best = max(checked, key=lambda c: c.per_gpu())
    if best.score <= 0:
        raise NoFeasibleConfigError(
            f"no configuration within {budget} GPUs meets TTFT {slo.ttft_s * 1e3:.0f} ms and "
            f"TPOT {slo.tpot_s * 1e3:.1f} ms for {slo.attainment:.0%} of requests at any rate",
            _closest(prober, checked),
        )
    best_d = max(
        (c for c in checked if not c.config.colocated), key=lambda c: c.per_gpu(), default=None
    )
    best_c = next((c for c in checked if c.config.colocated), None)
    reason = _decide(prober, best_d, best_c, phase) + _router_note(profile, best)
    curves = {
        c.config.describe(): attainment_curve(prober, c.config, c.score)
        for c in (best_d, best_c)
        if c is not None and c.score > 0
    }
    return PlanResult(
        budget,
        best,
        best_d,
        best_c,
        checked,
        phase,
        reason,
        curves,
        prober.num_simulations,
        prober.simulated_requests,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
    )
