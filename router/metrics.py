"""The router's Prometheus metrics: per-request latency by stage, outcomes, SLOs and tokens.

Everything here is measured per request at the router, the one place that sees a request end
to end. `RouterMetrics` owns a dedicated CollectorRegistry; `request(slo_class, slo)` returns
a `RequestObserver` for one Generate call, which watches the messages sent to the client (ITL
from the gaps between them; TTFT, end-to-end and the stage durations from the final message's
StageTimings) and records how the call ended (finished, rejected, failed).

Labels are bounded: model (one per router), stage (6), finish_reason (3), reason (a fixed
set), code (gRPC status names), slo_class (the configured classes; names are validated before
an observer exists). Never a request id.

SLO accounting: every validated request that ends counts once in `tandem_slo_requests_total`
(client cancels excepted: the client chose to leave); it counts in `tandem_slo_attained_total`
when it finished (stop or length) with TTFT <= its target and TPOT <= its target (unset targets
always hold). Goodput is `tandem_goodput_tokens_total`: generated tokens of attaining requests.
TPOT = (end_to_end - ttft) / (completion_tokens - 1), 0 for a single token.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from router.slo import Slo, SloClass
from tandem.api import generation_pb2 as pb
from tandem.contract.metrics_http import LATENCY_BUCKETS

STAGES = ("router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue", "decode")
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = (
    "invalid_argument",
    "slo_infeasible",
    "queue_full",
    "no_workers",
    "worker_rejected",
    "duplicate_request_id",
)
FAILURE_CODES = (
    "CANCELLED",
    "DEADLINE_EXCEEDED",
    "UNAVAILABLE",
    "INTERNAL",
)  # pre-created; others appear on use
_FINISH_NAMES = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
Send = Callable[[pb.GenerateResponse], Awaitable[None]]
_HISTOGRAM_PARTS = ("_upper_bounds", "_buckets", "_sum")  # prometheus_client's, see observe_many


class ClassSeries(NamedTuple):
    """One SLO class's series (the model label fixed)."""

    ttft: Histogram
    tpot: Histogram
    e2e: Histogram
    slo_requests: Counter
    slo_attained: Counter
    goodput_tokens: Counter


class RouterMetrics:
    """The router's metric families, in their own registry. Safe to use from one event loop;
    scrapes read it from the HTTP server's thread (prometheus-client locks each value)."""

    def __init__(
        self,
        model: str,
        slo_classes: Mapping[str, SloClass] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model = model
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.slo_target = Gauge(
            "tandem_slo_target_seconds",
            "Each SLO class's targets (kind: ttft or tpot).",
            ["model", "slo_class", "kind"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "tandem_stage_seconds",
            "Seconds a request spent in each stage.",
            ["model", "stage"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "Time to first token, at the router.",
            ["model", "slo_class"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "Gap between tokens sent to clients.",
            ["model"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds",
            "Mean time per output token after the first.",
            ["model", "slo_class"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.e2e = Histogram(
            "tandem_end_to_end_seconds",
            "End-to-end latency of finished requests.",
            ["model", "slo_class"],
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.finished = Counter(
            "tandem_requests_finished",
            "Requests finished, by finish reason.",
            ["model", "finish_reason"],
            registry=r,
        )
        self.rejected = Counter(
            "tandem_requests_rejected",
            "Requests refused before serving, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.failed = Counter(
            "tandem_requests_failed",
            "Requests that failed while served, by gRPC code.",
            ["model", "code"],
            registry=r,
        )
        self.slo_requests = Counter(
            "tandem_slo_requests",
            "Validated requests judged against their SLO.",
            ["model", "slo_class"],
            registry=r,
        )
        self.slo_attained = Counter(
            "tandem_slo_attained",
            "Requests that met their TTFT and TPOT targets.",
            ["model", "slo_class"],
            registry=r,
        )
        self.goodput_tokens = Counter(
            "tandem_goodput_tokens",
            "Generated tokens of requests that met their SLO.",
            ["model", "slo_class"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=r
        )
        self.cached_prompt_tokens = Counter(
            "tandem_cached_prompt_tokens",
            "Prompt tokens served from a prefix cache.",
            ["model"],
            registry=r,
        )
        self.generation_tokens = Counter(
            "tandem_generation_tokens",
            "Tokens generated for finished requests.",
            ["model"],
            registry=r,
        )
        classes = dict(slo_classes or {})
        self._touch(classes)
        # The per-message and per-request series of the one model label, resolved once
        # (`labels()` hashes and locks on every call).
        self.itl_child = self.itl.labels(model)
        self.prompt_tokens_child = self.prompt_tokens.labels(model)
        self.cached_prompt_tokens_child = self.cached_prompt_tokens.labels(model)
        self.generation_tokens_child = self.generation_tokens.labels(model)
        self.stage_children = tuple((s, self.stage_seconds.labels(model, s)) for s in STAGES)
        self.finished_children = {r: self.finished.labels(model, r) for r in FINISH_REASONS}
        self._class_series: dict[str, ClassSeries] = {}
        for name, cls in classes.items():
            for kind, target in (("ttft", cls.ttft_s), ("tpot", cls.tpot_s)):
                if target is not None:
                    self.slo_target.labels(model, name, kind).set(target)

    def _touch(self, slo_classes: Iterable[str]) -> None:
        """Create every bounded series at zero, so rates and dashboards see them from the start."""
        m = self.model
        for stage in STAGES:
            self.stage_seconds.labels(m, stage)
        for reason in FINISH_REASONS:
            self.finished.labels(m, reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(m, reason)
        for code in FAILURE_CODES:
            self.failed.labels(m, code)
        for name in slo_classes:
            for family in (
                self.ttft,
                self.tpot,
                self.e2e,
                self.slo_requests,
                self.slo_attained,
                self.goodput_tokens,
            ):
                family.labels(m, name)
        for family in (
            self.itl,
            self.prompt_tokens,
            self.cached_prompt_tokens,
            self.generation_tokens,
        ):
            family.labels(m)

    def class_series(self, slo_class: str) -> ClassSeries:
        """The per-class series of `slo_class`, resolved on first use (classes are validated
        before a request has an observer, so this stays bounded)."""
        series = self._class_series.get(slo_class)
        if series is None:
            m, c = self.model, slo_class
            series = ClassSeries(
                self.ttft.labels(m, c),
                self.tpot.labels(m, c),
                self.e2e.labels(m, c),
                self.slo_requests.labels(m, c),
                self.slo_attained.labels(m, c),
                self.goodput_tokens.labels(m, c),
            )
            self._class_series[slo_class] = series
        return series

    def request(self, slo_class: str, slo: Slo) -> RequestObserver:
        return RequestObserver(self, slo_class, slo)

    def reject_invalid(self) -> None:
        """A request that failed validation (no SLO was resolved for it)."""
        self.rejected.labels(self.model, "invalid_argument").inc()

    def watch(self, state: RouterStateSource) -> None:
        """Export the router's live state (queues, in-flight requests, worker health) at scrape time."""
        self.registry.register(_RouterStateCollector(self.model, state))


class RequestObserver:
    """Metrics of one Generate call. Call exactly one of the ending methods once: `on_message`
    with the final message (finish_reason set), `rejected(reason)` or `failed(code)`."""

    def __init__(self, metrics: RouterMetrics, slo_class: str, slo: Slo) -> None:
        self._m = metrics
        self._slo_class = slo_class
        self._slo = slo
        self._last_send: float | None = None
        self._ended = False

    def wrap(self, send: Send) -> Send:
        async def observed_send(msg: pb.GenerateResponse) -> None:
            self.on_message(msg)
            await send(msg)

        return observed_send

    def on_message(self, msg: pb.GenerateResponse, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._observe_itl(len(msg.token_ids), now)
        if msg.HasField("finish_reason"):
            self._finish(msg)

    def _observe_itl(self, num_tokens: int, now: float) -> None:
        """One gap per token: a message's tokens share the gap since the previous message
        (observed in one step, `observe_many`)."""
        if num_tokens == 0:
            return
        if self._last_send is None:  # the first token starts the clock; any others came with it
            gap, count = 0.0, num_tokens - 1
        else:
            gap, count = (now - self._last_send) / num_tokens, num_tokens
        self._last_send = now
        observe_many(self._m.itl_child, gap, count)

    def _finish(self, msg: pb.GenerateResponse) -> None:
        if self._ended:
            return
        self._ended = True
        m, series = self._m, self._m.class_series(self._slo_class)
        reason = _FINISH_NAMES.get(msg.finish_reason, "abort")
        m.finished_children[reason].inc()
        m.prompt_tokens_child.inc(msg.prompt_tokens)
        m.cached_prompt_tokens_child.inc(msg.cached_prompt_tokens)
        m.generation_tokens_child.inc(msg.completion_tokens)
        series.slo_requests.inc()
        if reason == "abort":
            return
        t = msg.timings
        for stage, child in m.stage_children:
            if t.HasField(stage):  # type: ignore[arg-type]
                observe_many(child, getattr(t, stage), 1)
        tpot = tpot_seconds(t.end_to_end, t.time_to_first_token, msg.completion_tokens)
        observe_many(series.ttft, t.time_to_first_token, 1)
        observe_many(series.tpot, tpot, 1)
        observe_many(series.e2e, t.end_to_end, 1)
        if slo_met(self._slo, t.time_to_first_token, tpot):
            series.slo_attained.inc()
            series.goodput_tokens.inc(msg.completion_tokens)

    def rejected(self, reason: str) -> None:
        """Refused before serving; `reason` is one of REJECT_REASONS (others are coerced)."""
        if self._end():
            safe = reason if reason in REJECT_REASONS else "worker_rejected"
            self._m.rejected.labels(self._m.model, safe).inc()
            self._m.slo_requests.labels(self._m.model, self._slo_class).inc()

    def failed(self, code: str) -> None:
        """Ended by an error (gRPC status code name) after it was accepted."""
        if self._end():
            self._m.failed.labels(self._m.model, code).inc()
            if code != "CANCELLED":
                self._m.slo_requests.labels(self._m.model, self._slo_class).inc()

    def _end(self) -> bool:
        ended, self._ended = self._ended, True
        return not ended


def observe_many(histogram: Histogram, value: float, count: int) -> None:
    """`histogram.observe(value)` `count` times, in one step.

    Hazard: this reaches into prometheus_client's Histogram (`_upper_bounds`, `_buckets`,
    `_sum`, pinned at 0.26 in requirements.lock); without them it falls back to `count`
    observes, so a changed library costs speed, never a wrong figure
    (tests/router/test_batched_metrics.py checks both agree)."""
    if count <= 0:
        return
    bounds, buckets, total = (getattr(histogram, n, None) for n in _HISTOGRAM_PARTS)
    if bounds is None or buckets is None or total is None or not value <= bounds[-1]:  # NaN
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    buckets[bisect_left(bounds, value)].inc(count)


def tpot_seconds(end_to_end: float, ttft: float, completion_tokens: int) -> float:
    return max(0.0, end_to_end - ttft) / (completion_tokens - 1) if completion_tokens > 1 else 0.0


def slo_met(slo: Slo, ttft: float, tpot: float) -> bool:
    return (slo.ttft_s is None or ttft <= slo.ttft_s) and (slo.tpot_s is None or tpot <= slo.tpot_s)


class RouterStateSource:
    """What the state collector reads (the Orchestrator and registry satisfy it via `router_state`)."""

    def __init__(
        self,
        waiting: Callable[[], int],
        inflight: Callable[[], int],
        active: Callable[[], int],
        workers: Callable[[], list[tuple[str, str, bool]]],
    ) -> None:
        self.waiting = waiting
        self.inflight = inflight
        self.active = active
        self.workers = workers


class _RouterStateCollector(Collector):
    def __init__(self, model: str, state: RouterStateSource) -> None:
        self._model = model
        self._state = state

    def describe(self) -> list[Any]:
        return []  # the worker series vary: no fixed description

    def collect(self) -> Iterable[GaugeMetricFamily]:
        s, model = self._state, self._model
        for name, doc, value in (
            ("tandem_router_queue_requests", "Requests waiting in the router queue.", s.waiting()),
            (
                "tandem_router_inflight_prefills",
                "Requests between placement and first token.",
                s.inflight(),
            ),
            ("tandem_router_active_requests", "Requests the router is serving.", s.active()),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([model], value)
            yield family
        up = GaugeMetricFamily(
            "tandem_worker_healthy",
            "1 while the router's heartbeats find the worker healthy.",
            labels=["model", "worker", "pool"],
        )
        for worker_id, pool, healthy in s.workers():
            up.add_metric([model, worker_id, pool], 1.0 if healthy else 0.0)
        yield up
