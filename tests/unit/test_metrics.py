"""Router and worker metrics without a cluster: what each observation does to the registry,
bounded labels, and every metric the shipped dashboards and alert rules use exists in code."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from engine.worker_stats import EngineLoad
from router.metrics import STAGES, RouterMetrics, RouterStateSource
from router.slo import DEFAULT_SLO_CLASSES, Slo
from tandem.api import generation_pb2 as pb
from tandem.contract.metrics_http import serve_registry
from tandem.pool.metrics import TierFigures, WorkerMetrics, WorkerSnapshot, transfer_failure_reason
from tests.e2e.deploy_exprs import (
    dashboard_exprs,
    dashboard_variable_queries,
    metric_names,
    rule_exprs,
)

SLO = Slo(ttft_s=1.0, tpot_s=0.1, best_effort=False, priority=0)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def _final(
    reason: int, ttft: float, e2e: float, tokens: int, prompt: int = 7
) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(
        request_id="r",
        token_ids=[1],
        finish_reason=reason,
        prompt_tokens=prompt,
        completion_tokens=tokens,
        cached_prompt_tokens=0,
    )
    stages = dict.fromkeys(STAGES, e2e / len(STAGES))
    msg.timings.CopyFrom(pb.StageTimings(time_to_first_token=ttft, end_to_end=e2e, **stages))
    return msg


def _router() -> RouterMetrics:
    metrics = RouterMetrics("tiny-random", DEFAULT_SLO_CLASSES)
    metrics.watch(
        RouterStateSource(lambda: 3, lambda: 2, lambda: 5, lambda: [("decode-0", "decode", False)])
    )
    return metrics


def test_a_finished_request_records_stages_tokens_itl_and_slo() -> None:
    m = _router()
    obs = m.request("interactive", SLO)
    obs.on_message(pb.GenerateResponse(token_ids=[5]), now=0.0)  # first token
    obs.on_message(pb.GenerateResponse(token_ids=[6, 7]), now=0.04)
    obs.on_message(_final(pb.FINISH_REASON_LENGTH, ttft=0.2, e2e=0.5, tokens=4), now=0.06)
    r = m.registry
    assert (
        _value(r, "tandem_requests_finished_total", model="tiny-random", finish_reason="length")
        == 1
    )
    assert (
        _value(r, "tandem_inter_token_latency_seconds_count", model="tiny-random") == 3
    )  # tokens - 1
    assert _value(
        r, "tandem_inter_token_latency_seconds_sum", model="tiny-random"
    ) == pytest.approx(0.06)
    for stage in STAGES:
        assert _value(r, "tandem_stage_seconds_count", model="tiny-random", stage=stage) == 1
    assert _value(r, "tandem_generation_tokens_total", model="tiny-random") == 4
    assert _value(r, "tandem_prompt_tokens_total", model="tiny-random") == 7
    assert (
        _value(r, "tandem_slo_attained_total", model="tiny-random", slo_class="interactive") == 1
    )  # tpot 0.1
    assert (
        _value(r, "tandem_goodput_tokens_total", model="tiny-random", slo_class="interactive") == 4
    )


def test_slo_miss_rejection_and_failure_count_against_attainment() -> None:
    m = _router()
    m.request("interactive", SLO).on_message(
        _final(pb.FINISH_REASON_STOP, ttft=1.5, e2e=1.6, tokens=2)
    )
    m.request("interactive", SLO).rejected("slo_infeasible")
    m.request("interactive", SLO).failed("UNAVAILABLE")
    cancelled = m.request("interactive", SLO)
    cancelled.failed("CANCELLED")
    cancelled.failed("CANCELLED")  # a second ending is ignored
    m.reject_invalid()
    r = m.registry
    assert _value(r, "tandem_slo_requests_total", model="tiny-random", slo_class="interactive") == 3
    assert _value(r, "tandem_slo_attained_total", model="tiny-random", slo_class="interactive") == 0
    assert (
        _value(r, "tandem_requests_rejected_total", model="tiny-random", reason="slo_infeasible")
        == 1
    )
    assert (
        _value(r, "tandem_requests_rejected_total", model="tiny-random", reason="invalid_argument")
        == 1
    )
    assert _value(r, "tandem_requests_failed_total", model="tiny-random", code="CANCELLED") == 1
    assert _value(r, "tandem_router_queue_requests", model="tiny-random") == 3
    assert (
        _value(r, "tandem_worker_healthy", model="tiny-random", worker="decode-0", pool="decode")
        == 0
    )
    assert (
        _value(
            r,
            "tandem_slo_target_seconds",
            model="tiny-random",
            slo_class="interactive",
            kind="ttft",
        )
        == 1.0
    )


def _worker(snapshot: WorkerSnapshot | None) -> WorkerMetrics:
    metrics = WorkerMetrics("tiny-random", "decode-0", "decode", lambda: snapshot)
    metrics.touch_transport("grpc")
    return metrics


def _snapshot() -> WorkerSnapshot:
    load = EngineLoad(
        num_queued_prefill_tokens=12,
        num_running=3,
        num_waiting=1,
        num_free_blocks=60,
        num_total_blocks=100,
        block_size=16,
        num_preemptions_total=2,
        prefix_queried_tokens=64,
        prefix_hit_tokens=16,
    )
    hbm = TierFigures({"used": 40, "cached": 10, "free": 50}, 64, 16)
    return WorkerSnapshot(load, {"hbm": hbm, "cpu": TierFigures({"used": 5, "free": 15}, 32, 32)})


def test_worker_metrics_steps_transfers_and_snapshot() -> None:
    m = _worker(_snapshot())
    m.on_step(48, 0.004)
    m.transfer_done("grpc", 4096, 0.01)
    m.transfer_failed("grpc", "timed out after 30.0s (RpcError)")
    r, w = m.registry, {"model": "tiny-random", "worker": "decode-0", "pool": "decode"}
    assert _value(r, "tandem_engine_batch_tokens_sum", **w) == 48
    assert _value(r, "tandem_engine_step_seconds_count", **w) == 1
    assert _value(r, "tandem_kv_transfer_bytes_total", **w, transport="grpc") == 4096
    assert (
        _value(r, "tandem_kv_transfer_failures_total", **w, transport="grpc", reason="timeout") == 1
    )
    assert _value(r, "tandem_engine_running_requests", **w) == 3
    assert _value(r, "tandem_engine_preemptions_total", **w) == 2
    assert _value(r, "tandem_kv_blocks", **w, tier="hbm", state="cached") == 10
    assert _value(r, "tandem_kv_usage_ratio", **w, tier="cpu") == 0.25
    assert _value(r, "tandem_kv_hit_tokens_total", **w, tier="hbm") == 16
    assert _value(r, "tandem_engine_healthy", **w) == 1


def test_a_dead_engine_reports_unhealthy_and_no_figures() -> None:
    r = _worker(None).registry
    assert (
        _value(r, "tandem_engine_healthy", model="tiny-random", worker="decode-0", pool="decode")
        == 0
    )
    assert (
        r.get_sample_value(
            "tandem_engine_running_requests",
            {"model": "tiny-random", "worker": "decode-0", "pool": "decode"},
        )
        is None
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("timed out after 3s", "timeout"),
        ("cancelled", "cancelled"),
        ("block 3: crc mismatch", "checksum"),
        ("StatusCode.UNAVAILABLE: failed to connect", "peer_unavailable"),
        ("weird", "other"),
        (None, "other"),
    ],
)
def test_transfer_failure_reasons_are_bounded(text: str | None, reason: str) -> None:
    assert transfer_failure_reason(text) == reason


def test_registries_serve_over_http_on_loopback() -> None:
    m = _router()
    endpoint = serve_registry(m.registry, "127.0.0.1", 0)
    try:
        assert endpoint.port > 0
        body = (
            urllib.request.urlopen(f"http://{endpoint.target}/metrics", timeout=5).read().decode()
        )
        assert (
            'tandem_stage_seconds_bucket{le="0.001",model="tiny-random",stage="decode"} 0.0' in body
        )
    finally:
        endpoint.close()
    with pytest.raises(ValueError):
        serve_registry(m.registry, "0.0.0.0", 0)


def _all_sample_names() -> set[str]:
    registries = [_router().registry, _worker(_snapshot()).registry]
    return {s.name for r in registries for fam in r.collect() for s in fam.samples}


def test_every_metric_in_dashboards_and_alerts_exists_in_code() -> None:
    exprs = dashboard_exprs() + rule_exprs() + dashboard_variable_queries()
    used = metric_names(exprs)
    assert len(dashboard_exprs()) >= 30 and len(rule_exprs()) >= 4 and used
    missing = used - _all_sample_names()
    assert not missing, f"dashboards/alerts use metrics no registry defines: {sorted(missing)}"


def test_no_label_can_hold_a_request_id() -> None:
    allowed = {
        "model",
        "stage",
        "slo_class",
        "finish_reason",
        "reason",
        "code",
        "worker",
        "pool",
        "tier",
        "state",
        "transport",
        "kind",
        "le",
    }
    registries = [_router().registry, _worker(_snapshot()).registry]
    labels = {k for r in registries for fam in r.collect() for s in fam.samples for k in s.labels}
    assert labels <= allowed, labels - allowed
