"""Pure router policy: placement, admission, SLO classes, the EDF queue and its starvation guard."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from engine.errors import InvalidRequestError
from engine.kv.block_hash import hash_blocks
from router.dispatch_gate import DispatchGate, RouterQueueFullError
from router.edf_queue import EdfQueue
from router.policy import (
    DecodeChoice,
    Demand,
    Placement,
    PrefillChoice,
    Rejection,
    WorkerView,
    place,
    place_colocated,
    place_decode,
    place_prefill,
    predict_tpot,
    predict_ttft,
)
from router.prefix_index import PrefixIndex
from router.slo import DEFAULT_SLO_CLASSES, Slo, resolve_slo
from tandem.contract.worker_api import CostModel, LoadSnapshot

PREFILL_COST = CostModel(
    prefill_s_per_token=1e-4, prefill_s_per_request=1e-3, transfer_s_per_token=1e-5
)
DECODE_COST = CostModel(
    decode_step_s=0.01, decode_step_s_per_seq=1e-4, decode_step_s_per_context_token=1e-6
)
NO_SLO = Slo(ttft_s=None, tpot_s=None, best_effort=False, priority=0)


def prefill_view(wid: str, queued: int = 0, pending: int = 0) -> WorkerView:
    load = LoadSnapshot(
        num_queued_prefill_tokens=queued, num_free_blocks=1000, num_total_blocks=1000
    )
    return WorkerView(wid, load, PREFILL_COST, pending_prefill_tokens=pending)


def decode_view(wid: str, free: int = 1000, running: int = 0, reserved: int = 0) -> WorkerView:
    load = LoadSnapshot(
        num_running=running, num_free_blocks=free, num_total_blocks=1000, block_size=16
    )
    return WorkerView(wid, load, DECODE_COST, reserved_blocks=reserved)


def demand(prompt: int = 1000, new: int = 100, slo: Slo = NO_SLO) -> Demand:
    return Demand(prompt, new, slo)


# -- prediction and placement ---------------------------------------------------------------


def test_ttft_prediction_counts_queue_uncached_prompt_and_transfer() -> None:
    view = prefill_view("p", queued=2000)
    expected = 2000 * 1e-4 + (1e-3 + 600 * 1e-4) + 1000 * 1e-5
    assert predict_ttft(view, demand(1000), num_cached_tokens=400, transfer=True) == pytest.approx(
        expected
    )
    assert predict_ttft(view, demand(1000), 400, transfer=False) == pytest.approx(
        expected - 1000 * 1e-5
    )


def test_router_pending_tokens_count_when_the_snapshot_lags() -> None:
    assert predict_ttft(
        prefill_view("p", queued=0, pending=5000), demand(), 0, transfer=False
    ) > predict_ttft(prefill_view("q"), demand(), 0, transfer=False)


def test_prefill_goes_to_lowest_predicted_ttft() -> None:
    views = [
        prefill_view("busy", queued=10_000),
        prefill_view("idle"),
        prefill_view("mid", queued=3000),
    ]
    choice = place_prefill(views, demand(), {})
    assert isinstance(choice, PrefillChoice) and choice.worker_id == "idle"


def test_prefix_hits_can_outweigh_a_short_queue() -> None:
    views = [prefill_view("cold"), prefill_view("warm", queued=200)]
    choice = place_prefill(views, demand(prompt=1000), {"warm": 960})
    assert isinstance(choice, PrefillChoice)
    assert choice.worker_id == "warm" and choice.num_cached_tokens == 960


def test_decode_needs_kv_headroom_for_the_whole_sequence() -> None:
    # prompt 1000 + 100 new = 1100 tokens = 69 blocks of 16
    views = [
        decode_view("tight", free=68),
        decode_view("reserved", free=100, reserved=40),
        decode_view("ok", free=69),
    ]
    choice = place_decode(views, demand())
    assert isinstance(choice, DecodeChoice) and choice.worker_id == "ok" and choice.num_blocks == 69
    rejected = place_decode(views[:2], demand())
    assert isinstance(rejected, Rejection) and "KV room" in rejected.reason


def test_decode_prefers_lower_predicted_tpot() -> None:
    views = [decode_view("loaded", running=200), decode_view("light", running=2)]
    choice = place_decode(views, demand())
    assert isinstance(choice, DecodeChoice) and choice.worker_id == "light"
    assert predict_tpot(views[0], demand()) > predict_tpot(views[1], demand())


def test_kv_headroom_is_hard_even_for_best_effort() -> None:
    slo = Slo(None, None, best_effort=True, priority=0)
    assert isinstance(place_decode([decode_view("full", free=1)], demand(slo=slo)), Rejection)


# -- admission ------------------------------------------------------------------------------


def test_infeasible_ttft_is_rejected_with_a_reason() -> None:
    slo = Slo(ttft_s=0.05, tpot_s=None, best_effort=False, priority=0)
    views = [prefill_view("a", queued=10_000), prefill_view("b", queued=20_000)]
    result = place(views, [decode_view("d")], demand(slo=slo), {})
    assert isinstance(result, Rejection) and "TTFT" in result.reason


def test_infeasible_tpot_is_rejected() -> None:
    slo = Slo(
        ttft_s=None, tpot_s=0.005, best_effort=False, priority=0
    )  # decode step floor is 10 ms
    result = place([prefill_view("p")], [decode_view("d")], demand(slo=slo), {})
    assert isinstance(result, Rejection) and "TPOT" in result.reason


def test_best_effort_is_placed_and_flagged_at_risk() -> None:
    slo = Slo(ttft_s=0.001, tpot_s=0.001, best_effort=True, priority=0)
    result = place([prefill_view("p", queued=10_000)], [decode_view("d")], demand(slo=slo), {})
    assert isinstance(result, Placement) and result.slo_at_risk
    assert (
        result.prefill.worker_id == "p"
        and result.decode is not None
        and result.decode.worker_id == "d"
    )


def test_feasible_request_is_not_at_risk() -> None:
    slo = Slo(ttft_s=1.0, tpot_s=0.1, best_effort=False, priority=0)
    result = place([prefill_view("p")], [decode_view("d")], demand(slo=slo), {})
    assert isinstance(result, Placement) and not result.slo_at_risk


def test_no_workers_is_a_rejection() -> None:
    assert isinstance(place([], [decode_view("d")], demand(), {}), Rejection)
    assert isinstance(place([prefill_view("p")], [], demand(), {}), Rejection)


def test_colocated_placement_checks_room_and_both_targets() -> None:
    cost = CostModel(prefill_s_per_token=1e-4, decode_step_s=0.01)
    load = LoadSnapshot(num_free_blocks=1000, num_total_blocks=1000)
    busy = WorkerView("busy", load, cost, pending_prefill_tokens=50_000)
    idle = WorkerView("idle", load, cost)
    full = WorkerView("full", LoadSnapshot(num_free_blocks=2, num_total_blocks=1000), cost)
    ok = place_colocated([busy, idle, full], demand(slo=Slo(1.0, 0.1, False, 0)), {})
    assert isinstance(ok, Placement) and ok.decode is None and ok.prefill.worker_id == "idle"
    assert isinstance(
        place_colocated([busy, idle], demand(slo=Slo(1.0, 0.001, False, 0)), {}), Rejection
    )
    assert isinstance(place_colocated([full], demand(), {}), Rejection)


# -- SLO classes ----------------------------------------------------------------------------


def test_slo_class_defaults_and_explicit_overrides() -> None:
    base = resolve_slo(DEFAULT_SLO_CLASSES)
    assert base == Slo(1.0, 0.1, False, 0)
    assert resolve_slo(DEFAULT_SLO_CLASSES, slo_class="batch", ttft_ms=500).ttft_s == 0.5
    assert resolve_slo(DEFAULT_SLO_CLASSES, slo_class="best_effort").best_effort
    assert resolve_slo(DEFAULT_SLO_CLASSES, priority=-3).priority == -3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"slo_class": "nope"}, "slo_class"),
        ({"ttft_ms": -1.0}, "ttft_ms"),
        ({"tpot_ms": float("nan")}, "tpot_ms"),
    ],
)
def test_bad_slo_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_slo(DEFAULT_SLO_CLASSES, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# -- EDF queue ------------------------------------------------------------------------------


def test_edf_orders_by_priority_then_deadline_then_arrival() -> None:
    q: EdfQueue[str] = EdfQueue(starvation_s=100.0)
    q.push("late", priority=0, deadline=30.0, now=0.0)
    q.push("none", priority=0, deadline=None, now=0.0)
    q.push("early", priority=0, deadline=10.0, now=0.0)
    q.push("urgent-low-prio", priority=5, deadline=1.0, now=0.0)
    q.push("early-2", priority=0, deadline=10.0, now=0.0)
    q.push("high-prio", priority=-1, deadline=None, now=0.0)
    order = [q.pop(now=1.0) for _ in range(len(q))]
    assert order == ["high-prio", "early", "early-2", "late", "none", "urgent-low-prio"]


def test_starvation_guard_serves_the_oldest_waiter() -> None:
    q: EdfQueue[str] = EdfQueue(starvation_s=5.0)
    q.push("starving", priority=10, deadline=None, now=0.0)
    for i in range(3):
        q.push(f"urgent-{i}", priority=0, deadline=1.0, now=4.0)
    assert q.pop(now=4.5) == "urgent-0"  # not starving yet
    assert q.pop(now=6.0) == "starving"  # waited 6 s > 5 s
    assert q.pop(now=6.0) == "urgent-1"


def test_removed_entries_are_skipped() -> None:
    q: EdfQueue[str] = EdfQueue(starvation_s=1.0)
    a = q.push("a", priority=0, deadline=1.0, now=0.0)
    q.push("b", priority=0, deadline=2.0, now=0.0)
    assert q.remove(a) and not q.remove(a)
    assert len(q) == 1 and q.pop(now=10.0) == "b"
    with pytest.raises(IndexError):
        q.pop(now=10.0)


def test_dispatch_gate_serves_waiters_in_edf_order_and_bounds_the_queue() -> None:
    async def scenario() -> list[str]:
        gate = DispatchGate(capacity=1, max_queue=2, starvation_s=100.0)
        await gate.acquire(0, None)
        served: list[str] = []

        async def waiter(name: str, priority: int) -> None:
            await gate.acquire(priority, None)
            served.append(name)
            gate.release()

        tasks = [asyncio.create_task(waiter("low", 5)), asyncio.create_task(waiter("high", 0))]
        await asyncio.sleep(0)
        with pytest.raises(RouterQueueFullError):
            await gate.acquire(0, None)
        gate.release()
        await asyncio.gather(*tasks)
        assert gate.num_in_use == 0 and gate.num_waiting == 0
        return served

    assert asyncio.run(scenario()) == ["high", "low"]


def test_cancelled_waiter_does_not_leak_its_slot() -> None:
    async def scenario() -> int:
        gate = DispatchGate(capacity=1, max_queue=10, starvation_s=100.0)
        await gate.acquire(0, None)
        task = asyncio.create_task(gate.acquire(0, None))
        await asyncio.sleep(0)
        gate.release()  # hands the slot to the waiter ...
        task.cancel()  # ... which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await task
        return gate.num_in_use

    assert asyncio.run(scenario()) == 0


# -- prefix estimate ------------------------------------------------------------------------


def test_prefix_index_counts_the_longest_recorded_prefix_and_evicts_lru() -> None:
    index = PrefixIndex(capacity_blocks=4)
    a = hash_blocks(list(range(64)), 16, "m")
    index.record(a)
    b = hash_blocks(list(range(32)) + [999] * 32, 16, "m")
    assert index.num_hit_blocks(b) == 2  # shared first two blocks, then the chain diverges
    assert index.num_hit_blocks(hash_blocks(list(range(64)), 16, "other-model")) == 0
    index.record(b[2:])  # two new hashes evict the two least recent
    assert len(index) == 4 and index.num_hit_blocks(a) == 0


def test_router_imports_no_torch() -> None:
    code = (
        "import sys, router.server, tandem.testing.fake_worker, router.policy, tandem.client\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
