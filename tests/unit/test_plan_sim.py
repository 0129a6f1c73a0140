"""`tandem plan`'s simulator: it runs the production router policy and scheduler, is
deterministic for a seed, and its goodput search finds a known capacity."""

from __future__ import annotations

from typing import Any

import pytest

import engine.scheduler.scheduler as scheduler_module
import router.policy as policy_module
from tandem.plan.calibrate import DecodeSample, PrefillSample, fit_step_costs
from tandem.plan.cluster import ClusterConfig, EngineLimits, SloTargets
from tandem.plan.errors import PlanError
from tandem.plan.planner import plan
from tandem.plan.profile import (
    CostProfile,
    StepCosts,
    load_profile,
    profile_from_dict,
    shipped_profiles,
)
from tandem.plan.search import Prober, SearchSettings, max_rate
from tandem.plan.simulator import Phase, simulate
from tandem.plan.workload import Lengths, Workload, mix, trace

SLO = SloTargets(ttft_s=0.5, tpot_s=0.05)


def toy_profile(**overrides: Any) -> CostProfile:
    """Costs in round numbers: a 100-token prefill takes 20 ms, a decode step 10 ms + 1 ms/seq."""
    costs = {
        "prefill_s": 0.01,
        "prefill_s_per_token": 1e-4,
        "prefill_s_per_token_pair": 0.0,
        "decode_step_s": 0.01,
        "decode_s_per_seq": 0.001,
        "decode_s_per_context_token": 0.0,
        "kv_capacity_tokens": 16 * 400,
    } | overrides
    return profile_from_dict(
        {
            "name": "toy",
            "gpu": "toy",
            "model": "toy",
            "kv_bytes_per_token": 1000,
            "max_model_len": 1024,
            "tp": {"1": costs, "2": costs},
            "links": {"nvlink": {"latency_s": 0.001, "bytes_per_s": 1e10}},
        }
    )


WORKLOAD = Workload("toy", (Lengths(100, 20), Lengths(60, 40)))
DISAGG = ClusterConfig(num_prefill=2, num_decode=2)


def _fates(result: Any) -> list[tuple[Any, ...]]:
    return [(r.prefill_id, r.decode_id, r.first_token, r.finish, r.failed) for r in result.records]


def test_every_request_is_served_at_light_load() -> None:
    arrivals = trace(WORKLOAD, 10.0, 5.0, seed=1)
    result = simulate(toy_profile(), DISAGG, SLO, arrivals, 10.0)
    assert len(arrivals) > 20
    assert all(r.finish is not None and r.failed is None for r in result.records)
    assert result.attainment(SLO) == 1.0
    # the first token comes after at least one prefill step; TPOT at least one decode step
    assert min(r.ttft for r in result.records if r.ttft is not None) >= 0.01
    assert min(r.tpot for r in result.records if r.tpot is not None) >= 0.011


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    runs = [
        simulate(toy_profile(), DISAGG, SLO, trace(WORKLOAD, 20.0, 4.0, seed), 20.0)
        for seed in (3, 3, 4)
    ]
    assert _fates(runs[0]) == _fates(runs[1])
    assert _fates(runs[0]) != _fates(runs[2])


def test_changing_the_router_policy_changes_the_simulated_placement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The simulator places with router.policy itself: predicting no queue wait sends every
    prompt to the first prefill worker (ties go to the first), where the real policy spreads."""
    arrivals = trace(WORKLOAD, 30.0, 3.0, seed=5)
    spread = {r.prefill_id for r in simulate(toy_profile(), DISAGG, SLO, arrivals, 30.0).records}
    assert spread == {"prefill-0", "prefill-1"}
    monkeypatch.setattr(policy_module, "predict_queue_wait", lambda view: 0.0)
    assert {r.prefill_id for r in simulate(toy_profile(), DISAGG, SLO, arrivals, 30.0).records} == {
        "prefill-0"
    }


def test_changing_the_scheduler_policy_changes_the_simulated_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each simulated step is the real Scheduler's: serving the newest request first (the
    policy order reversed) changes who gets its first token when."""
    config = ClusterConfig(num_colocated=1, colocated_limits=EngineLimits(max_num_seqs=4))
    arrivals = trace(WORKLOAD, 40.0, 2.0, seed=6)
    before = _fates(simulate(toy_profile(), config, SLO, arrivals, 40.0))
    real = scheduler_module.sort_by_policy
    monkeypatch.setattr(
        scheduler_module, "sort_by_policy", lambda rs, now, t: real(rs, now, t)[::-1]
    )
    assert _fates(simulate(toy_profile(), config, SLO, arrivals, 40.0)) != before


def test_max_rate_bisects_to_the_threshold() -> None:
    found = max_rate(lambda r: r <= 7.3, start=1.0, bisect_steps=12)
    assert 7.0 <= found <= 7.3
    assert max_rate(lambda r: False, start=1.0, bisect_steps=5) == 0.0


def test_prefill_goodput_is_near_the_workers_capacity() -> None:
    """Fixed 100-token prompts: 10 ms of tokens each plus a 10 ms step floor shared by the
    prompts of one step, so one worker serves 50 (one per step) to 100 prompts/s; a 10 s trace
    lets a few percent of overload through before TTFT passes 0.5 s."""
    prober = Prober(toy_profile(), SLO, mix("5:1", unit=20), SearchSettings(duration_s=10.0))
    goodput = prober.max_rate(ClusterConfig(num_prefill=1), 5.0, Phase.PREFILL)
    assert 50.0 <= goodput <= 110.0


def test_plan_picks_a_configuration_within_the_budget() -> None:
    settings = SearchSettings(duration_s=3.0, bisect_steps=3, top_k=1, curve_points=3)
    result = plan(toy_profile(), WORKLOAD, SLO, 4, [1], settings)
    assert result.best.config.num_gpus <= 4 and result.best.score > 0
    assert result.best_colocated is not None and result.best_disaggregated is not None
    assert result.reason.startswith(("disaggregate", "do not disaggregate"))
    assert set(result.curves) and all(len(c) == 3 for c in result.curves.values())


def test_a_budget_below_one_worker_is_refused() -> None:
    with pytest.raises(PlanError, match="smaller than one worker"):
        plan(toy_profile(), WORKLOAD, SLO, 1, [2])


def test_shipped_profiles_load_and_a_bad_field_is_named() -> None:
    assert {"h100-llama3-8b", "cpu-tiny-random"} <= set(shipped_profiles())
    h100 = load_profile("h100-llama3-8b")
    assert h100.costs(1).decode_seconds(256, 256 * 1024) == pytest.approx(0.0258, rel=0.03)
    assert h100.costs(1).prefill_seconds(4096) == pytest.approx(0.1044, rel=0.01)
    with pytest.raises(PlanError, match=r"tp\.1\.decode_step_s"):
        toy_profile(decode_step_s=-1.0)


def test_calibration_recovers_known_costs() -> None:
    truth = StepCosts(0.002, 3e-5, 2e-9, 0.005, 4e-5, 7e-8, 1000)
    prefill = [
        PrefillSample(n, c, truth.prefill_seconds(n, c))
        for n, c in ((16, 0), (256, 0), (1024, 0), (512, 512), (64, 960))
    ]
    decode = [
        DecodeSample(b, b * c, truth.decode_seconds(b, b * c))
        for b in (1, 8, 32)
        for c in (128, 1024)
    ]
    fitted = fit_step_costs(prefill, decode, 1000)
    for name in (
        "prefill_s",
        "prefill_s_per_token",
        "prefill_s_per_token_pair",
        "decode_step_s",
        "decode_s_per_seq",
        "decode_s_per_context_token",
    ):
        assert getattr(fitted, name) == pytest.approx(getattr(truth, name), rel=1e-6)


def test_the_planner_imports_no_torch() -> None:
    """Pure Python: only `calibrate.calibrate_engine` loads the engine, when called."""
    import subprocess
    import sys

    code = (
        "import sys, tandem.plan.planner, tandem.plan.cli, tandem.plan.report, "
        "tandem.plan.calibrate; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_cell_keeps_the_ratio_of_a_large_config() -> None:
    from tandem.plan.search import cell_of

    big = ClusterConfig(num_prefill=256, num_decode=768)
    cell = cell_of(big, 8)
    assert (cell.num_prefill, cell.num_decode) == (2, 6)
    assert cell_of(ClusterConfig(num_colocated=512, colocated_tp=2), 8).num_colocated == 4
    assert cell_of(DISAGG, 8) == DISAGG
