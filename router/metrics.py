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
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

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
        if num_tokens == 0:
            return
        if self._last_send is None:  # the first token starts the clock; any others came with it
            gaps = [0.0] * (num_tokens - 1)
        else:
            gaps = [(now - self._last_send) / num_tokens] * num_tokens
        self._last_send = now
        child = self._m.itl.labels(self._m.model)
        for gap in gaps:
            child.observe(gap)

    def _finish(self, msg: pb.GenerateResponse) -> None:
        if self._ended:
            return
        self._ended = True
        m, model, cls = self._m, self._m.model, self._slo_class
        reason = _FINISH_NAMES.get(msg.finish_reason, "abort")
        m.finished.labels(model, reason).inc()
        m.prompt_tokens.labels(model).inc(msg.prompt_tokens)
        m.cached_prompt_tokens.labels(model).inc(msg.cached_prompt_tokens)
        m.generation_tokens.labels(model).inc(msg.completion_tokens)
        m.slo_requests.labels(model, cls).inc()
        if reason == "abort":
            return
        t = msg.timings
        for stage in STAGES:
            if t.HasField(stage):  # type: ignore[arg-type]
                m.stage_seconds.labels(model, stage).observe(getattr(t, stage))
        tpot = tpot_seconds(t.end_to_end, t.time_to_first_token, msg.completion_tokens)
        m.ttft.labels(model, cls).observe(t.time_to_first_token)
        m.tpot.labels(model, cls).observe(tpot)
        m.e2e.labels(model, cls).observe(t.end_to_end)
        if slo_met(self._slo, t.time_to_first_token, tpot):
            m.slo_attained.labels(model, cls).inc()
            m.goodput_tokens.labels(model, cls).inc(msg.completion_tokens)

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
