"""router.stage_clock: the stages of a final message add up to its end-to-end latency."""

from __future__ import annotations

import pytest

from router.stage_clock import StageMarks, StageTimings, stage_timings
from tandem.contract.worker_api import StageTimes

STAGES = ("router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue", "decode")


def _sum(msg: StageTimings) -> float:
    return sum(getattr(msg, s) for s in STAGES if getattr(msg, s) is not None)


def test_disaggregated_attribution() -> None:
    marks = StageMarks(arrival=10.0, dispatched=10.1, prefill_done=10.6, decode_started=10.65)
    prefill = StageTimes(prefill_queue=0.2, prefill=0.25)
    decode = StageTimes(kv_transfer=0.05, decode_queue=0.01, decode=0.5)
    msg = stage_timings(marks, prefill, decode, end=11.3)
    assert msg.router_queue == pytest.approx(0.1)
    assert msg.prefill == pytest.approx(0.25)
    assert msg.prefill_queue == pytest.approx(0.25)  # worker queue 0.2 + the two hops 0.05
    assert msg.kv_transfer == pytest.approx(0.05 + 0.05)  # router handoff + the transfer
    assert msg.decode_queue == pytest.approx(0.01)
    assert msg.decode == pytest.approx(0.65 - 0.05 - 0.01)
    assert msg.time_to_first_token == pytest.approx(0.6)
    assert _sum(msg) == pytest.approx(msg.end_to_end) and msg.end_to_end == pytest.approx(1.3)


def test_colocated_uses_the_workers_compute_and_has_no_transfer() -> None:
    marks = StageMarks(arrival=0.0, dispatched=0.02, prefill_done=0.3, colocated=True)
    times = StageTimes(prefill_queue=0.1, prefill=0.15, decode_queue=0.0, decode=0.6)
    msg = stage_timings(marks, None, times, end=1.0)
    assert msg.kv_transfer is None
    assert msg.prefill == pytest.approx(0.15) and msg.prefill_queue == pytest.approx(0.13)
    assert msg.decode == pytest.approx(0.7) and msg.decode_queue == 0.0
    assert _sum(msg) == pytest.approx(1.0)


def test_request_ending_at_its_first_token() -> None:
    marks = StageMarks(arrival=0.0, dispatched=0.01, prefill_done=0.2)
    msg = stage_timings(marks, StageTimes(prefill_queue=0.0, prefill=0.1), None, end=0.21)
    assert msg.decode is None and msg.kv_transfer is None
    assert _sum(msg) == pytest.approx(0.21)


def test_aborted_before_dispatch_is_all_router_queue() -> None:
    msg = stage_timings(StageMarks(arrival=1.0), None, None, end=1.5)
    assert msg.router_queue == pytest.approx(0.5) and _sum(msg) == pytest.approx(0.5)


def test_worker_figures_larger_than_the_span_are_clamped() -> None:
    marks = StageMarks(arrival=0.0, dispatched=0.0, prefill_done=0.1, decode_started=0.1)
    msg = stage_timings(
        marks, StageTimes(prefill=5.0), StageTimes(kv_transfer=9.0, decode_queue=9.0), end=0.3
    )
    assert min(getattr(msg, s) for s in STAGES) >= 0.0
    assert _sum(msg) == pytest.approx(0.3)
