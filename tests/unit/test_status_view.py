"""tandem.status_view without a cluster: parsing real exposition text, quantiles like
Prometheus', and a rendered frame naming every stage and worker."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest
from rich.console import Console

from router.slo import DEFAULT_SLO_CLASSES
from tandem.api import generation_pb2 as pb
from tandem.status_view import STAGES, StatusSnapshot, histogram_quantile, parse_samples, render
from tests.unit.test_metrics import SLO, _final, _router, _snapshot, _worker


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.1, 10.0), (0.2, 30.0), (0.4, 40.0), (math.inf, 40.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(
        0.15
    )  # rank 20: halfway through (0.1, 0.2]
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.1)
    assert histogram_quantile(1.0, buckets) == pytest.approx(0.4)
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))
    assert (
        histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 2.0)]) == 0.1
    )  # the +Inf bucket: the last finite bound


def _frame() -> StatusSnapshot:
    router = _router()
    router.request("interactive", SLO).on_message(
        _final(pb.FINISH_REASON_STOP, ttft=0.2, e2e=0.5, tokens=4)
    )
    router.request("interactive", SLO).rejected("queue_full")
    texts = [
        generate_latest(router.registry).decode(),
        generate_latest(_worker(_snapshot()).registry).decode(),
    ]
    samples, per_worker = parse_samples(texts)
    status = pb.ClusterStatus(
        workers=[
            pb.WorkerStatus(
                worker_id="decode-0",
                pool="decode",
                healthy=True,
                load=pb.LoadSnapshot(running=3, total_kv_blocks=100),
            )
        ]
    )
    return StatusSnapshot(status, samples, taken_at=10.0, worker_samples=per_worker)


def test_parsed_samples_sum_over_targets_and_index_workers() -> None:
    snap = _frame()
    assert snap.total("tandem_requests_finished_total", finish_reason="stop") == 1
    assert snap.total("tandem_requests_rejected_total") == 1
    assert snap.buckets("tandem_stage_seconds", stage="decode")[-1] == (math.inf, 1.0)
    assert snap.worker_samples["decode-0"]["tandem_kv_blocks{state=cached,tier=hbm}"] == 10
    assert set(snap.by("tandem_slo_requests_total", "slo_class")) == set(DEFAULT_SLO_CLASSES)


def test_render_shows_every_stage_worker_and_class() -> None:
    console = Console(record=True, width=200)
    console.print(render(_frame()))
    text = console.export_text()
    for word in (
        *STAGES,
        "TTFT",
        "decode-0",
        "interactive",
        "rejected: queue_full",
        "25.0%",
        "50.0%",
    ):
        assert word in text, word
