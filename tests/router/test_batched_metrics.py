"""Metrics observed in batches (router.metrics.observe_many): the same histogram as one
observe per value, on prometheus_client's fast path and on the fallback."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Histogram

from router.metrics import RouterMetrics, observe_many
from router.slo import DEFAULT_SLO_CLASSES, Slo
from tandem.api import generation_pb2 as pb
from tandem.contract.metrics_http import LATENCY_BUCKETS

SLO = Slo(ttft_s=None, tpot_s=None, best_effort=False, priority=0)


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def _histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("h_seconds", "test", registry=registry, buckets=LATENCY_BUCKETS)


VALUES = [0.0, LATENCY_BUCKETS[0], LATENCY_BUCKETS[3], 0.0123, LATENCY_BUCKETS[-1], 1e9, -1.0]


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("count", [0, 1, 7])
def test_observe_many_equals_repeated_observe(value: float, count: int) -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    h1, h2 = _histogram(one_by_one), _histogram(batched)
    for _ in range(count):
        h1.observe(value)
    observe_many(h2, value, count)
    assert _samples(one_by_one) == pytest.approx(_samples(batched))


class _PlainHistogram:
    """A histogram without prometheus_client's internals: observe_many must loop."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


def test_observe_many_falls_back_to_observe_without_the_internals() -> None:
    plain = _PlainHistogram()
    observe_many(plain, 0.5, 3)  # type: ignore[arg-type]
    assert plain.values == [0.5, 0.5, 0.5]


def test_nan_takes_the_slow_path_and_matches_observe() -> None:
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    h1, h2 = _histogram(one_by_one), _histogram(batched)
    h1.observe(math.nan)
    observe_many(h2, math.nan, 1)
    counts = [
        {k: v for k, v in _samples(r).items() if k[0].endswith("_bucket")}
        for r in (one_by_one, batched)
    ]
    assert counts[0] == counts[1]


def test_itl_counts_one_gap_per_token_after_the_first() -> None:
    metrics = RouterMetrics("m", DEFAULT_SLO_CLASSES)
    obs = metrics.request("interactive", SLO)
    obs.on_message(pb.GenerateResponse(token_ids=[1, 2]), now=0.0)  # first: 1 gap of 0
    obs.on_message(pb.GenerateResponse(token_ids=[3, 4, 5]), now=0.03)  # 3 gaps of 0.01
    obs.on_message(pb.GenerateResponse(), now=0.05)  # no tokens: nothing
    r = metrics.registry
    labels = {"model": "m"}
    assert r.get_sample_value("tandem_inter_token_latency_seconds_count", labels) == 4
    assert r.get_sample_value("tandem_inter_token_latency_seconds_sum", labels) == pytest.approx(
        0.03
    )
    le = {"model": "m", "le": "0.01"}
    assert r.get_sample_value("tandem_inter_token_latency_seconds_bucket", le) == 4
