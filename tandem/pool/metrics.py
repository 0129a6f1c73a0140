"""Prometheus metrics of one pool worker (prefill, decode or colocated): engine and KV figures.

`WorkerMetrics` owns a dedicated CollectorRegistry. Three kinds of figures:
  * per step, pushed by the engine loop's step listener (`on_step`): step time and tokens per
    step (the batch size in tokens);
  * per KV transfer, pushed by the decode worker: bytes, seconds, failures by reason;
  * live state, pulled at scrape time by calling `snapshot()` (which the worker runs on its
    engine thread, so the figures are consistent): running / waiting requests, queued prefill
    tokens, preemptions, KV blocks by tier and state, prefix lookups and hits by tier.

Labels: model, worker, pool on every series; plus tier ("hbm", "cpu", "nvme"), state ("used",
"cached": free but holding a reusable prefix, "free"), transport, and a failure reason from the
fixed set TRANSFER_FAILURE_REASONS. Never a request id. The engine package stays free of
Prometheus: it only exposes plain numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.engine import LLMEngine
from engine.worker_stats import EngineLoad, engine_load
from tandem.contract.metrics_http import LATENCY_BUCKETS

log = logging.getLogger(__name__)
BATCH_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
TRANSFER_FAILURE_REASONS = (
    "timeout",
    "cancelled",
    "checksum",
    "unknown_transfer",
    "peer_unavailable",
    "other",
)


@dataclass(frozen=True)
class TierFigures:
    """One KV tier's blocks by state and its lifetime prefix lookups / hits (in tokens)."""

    blocks: Mapping[str, int]
    lookup_tokens: int = 0
    hit_tokens: int = 0


@dataclass(frozen=True)
class WorkerSnapshot:
    load: EngineLoad
    tiers: Mapping[str, TierFigures] = field(default_factory=dict)


def engine_snapshot(engine: LLMEngine) -> WorkerSnapshot:
    """The engine's figures with its HBM tier; must run on the engine thread."""
    load = engine_load(engine)
    cached = engine.kv_manager.pool.num_cached_free_blocks
    hbm = TierFigures(
        blocks={
            "used": load.num_total_blocks - load.num_free_blocks,
            "cached": cached,
            "free": load.num_free_blocks - cached,
        },
        lookup_tokens=load.prefix_queried_tokens,
        hit_tokens=load.prefix_hit_tokens,
    )
    return WorkerSnapshot(load, {"hbm": hbm})


def tier_figures(store: Any, block_size: int) -> dict[str, TierFigures]:
    """The CPU and NVMe tiers of a kvtransfer TieredStore (blocks held, free, lookups, hits)."""
    figures = {}
    capacity = {"cpu": store.cpu.num_slots, "nvme": store.nvme.lru.num_slots if store.nvme else 0}
    for tier, stats in store.stats().items():
        name = tier.value
        if name not in capacity or not capacity[name]:
            continue
        figures[name] = TierFigures(
            blocks={"used": stats.blocks, "free": capacity[name] - stats.blocks},
            lookup_tokens=(stats.hits + stats.misses) * block_size,
            hit_tokens=stats.hits * block_size,
        )
    return figures


def transfer_failure_reason(text: str | None) -> str:
    """Map a receiver's free-text failure reason onto the bounded label set."""
    t = (text or "").lower()
    for needle, reason in (
        ("timed out", "timeout"),
        ("timeout", "timeout"),
        ("cancel", "cancelled"),
        ("crc", "checksum"),
        ("checksum", "checksum"),
        ("unknown transfer", "unknown_transfer"),
        ("unavailable", "peer_unavailable"),
        ("connect", "peer_unavailable"),
    ):
        if needle in t:
            return reason
    return "other"


class WorkerMetrics:
    def __init__(
        self,
        model: str,
        worker_id: str,
        pool: str,
        snapshot: Callable[[], WorkerSnapshot | None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.labels = (model, worker_id, pool)
        self.registry = registry if registry is not None else CollectorRegistry()
        names, r = ["model", "worker", "pool"], self.registry
        self.step_seconds = Histogram(
            "tandem_engine_step_seconds",
            "Wall time of one engine step.",
            names,
            registry=r,
            buckets=LATENCY_BUCKETS,
        ).labels(*self.labels)
        self.batch_tokens = Histogram(
            "tandem_engine_batch_tokens",
            "Tokens fed to the model per step.",
            names,
            registry=r,
            buckets=BATCH_TOKEN_BUCKETS,
        ).labels(*self.labels)
        tnames = [*names, "transport"]
        self._bytes = Counter(
            "tandem_kv_transfer_bytes", "KV bytes received by transfers.", tnames, registry=r
        )
        self._seconds = Counter(
            "tandem_kv_transfer_seconds", "Seconds spent receiving KV.", tnames, registry=r
        )
        self._count = Counter("tandem_kv_transfers", "KV transfers completed.", tnames, registry=r)
        self._failures = Counter(
            "tandem_kv_transfer_failures",
            "KV transfers that failed, by reason.",
            [*tnames, "reason"],
            registry=r,
        )
        r.register(_SnapshotCollector(self.labels, snapshot))

    def touch_transport(self, transport: str) -> None:
        """Create this transport's transfer series at zero (dashboards and alerts see them at once)."""
        for family in (self._bytes, self._seconds, self._count):
            family.labels(*self.labels, transport)
        for reason in TRANSFER_FAILURE_REASONS:
            self._failures.labels(*self.labels, transport, reason)

    def on_step(self, num_batched_tokens: int, seconds: float) -> None:
        """The engine loop's step listener (engine thread)."""
        self.step_seconds.observe(seconds)
        self.batch_tokens.observe(num_batched_tokens)

    def transfer_done(self, transport: str, num_bytes: int, seconds: float) -> None:
        self._bytes.labels(*self.labels, transport).inc(num_bytes)
        self._seconds.labels(*self.labels, transport).inc(max(0.0, seconds))
        self._count.labels(*self.labels, transport).inc()

    def transfer_failed(self, transport: str, reason_text: str | None) -> None:
        self._failures.labels(*self.labels, transport, transfer_failure_reason(reason_text)).inc()


class _SnapshotCollector(Collector):
    """Live figures, read once per scrape. A snapshot that fails reports `tandem_engine_healthy 0`."""

    def __init__(
        self, labels: tuple[str, str, str], snapshot: Callable[[], WorkerSnapshot | None]
    ) -> None:
        self._labels = list(labels)
        self._snapshot = snapshot

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model", "worker", "pool"])
        family.add_metric(self._labels, value)
        return family

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        try:
            snap = self._snapshot()
        except Exception:  # a scrape must never raise into the HTTP server
            log.exception("metrics snapshot failed")
            snap = None
        yield self._gauge(
            "tandem_engine_healthy",
            "1 while the engine loop answers.",
            0.0 if snap is None else 1.0,
        )
        if snap is None:
            return
        load = snap.load
        yield self._gauge(
            "tandem_engine_running_requests", "Requests in the running batch.", load.num_running
        )
        yield self._gauge(
            "tandem_engine_waiting_requests", "Requests waiting for admission.", load.num_waiting
        )
        yield self._gauge(
            "tandem_engine_queued_prefill_tokens",
            "Prompt tokens not yet prefilled.",
            load.num_queued_prefill_tokens,
        )
        preempt = CounterMetricFamily(
            "tandem_engine_preemptions", "Requests preempted.", labels=["model", "worker", "pool"]
        )
        preempt.add_metric(self._labels, load.num_preemptions_total)
        yield preempt
        yield from self._speculation(load)
        yield from self._kv(snap.tiers)

    def _speculation(self, load: EngineLoad) -> Iterable[CounterMetricFamily]:
        """Speculative decoding: drafts verified and accepted (their ratio is the acceptance
        rate; accepted / verify steps + 1 the mean accepted length)."""
        for name, doc, value in (
            ("tandem_spec_draft_tokens", "Draft tokens verified.", load.num_draft_tokens_total),
            (
                "tandem_spec_accepted_tokens",
                "Draft tokens accepted.",
                load.num_accepted_tokens_total,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["model", "worker", "pool"])
            family.add_metric(self._labels, value)
            yield family

    def _kv(
        self, tiers: Mapping[str, TierFigures]
    ) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        names = ["model", "worker", "pool", "tier"]
        blocks = GaugeMetricFamily(
            "tandem_kv_blocks", "KV blocks by tier and state.", labels=[*names, "state"]
        )
        usage = GaugeMetricFamily(
            "tandem_kv_usage_ratio", "Fraction of a tier's blocks in use.", labels=names
        )
        lookups = CounterMetricFamily(
            "tandem_kv_lookup_tokens", "Tokens looked up in a KV tier.", labels=names
        )
        hits = CounterMetricFamily(
            "tandem_kv_hit_tokens", "Looked-up tokens found in a KV tier.", labels=names
        )
        for tier, fig in tiers.items():
            for state, count in fig.blocks.items():
                blocks.add_metric([*self._labels, tier, state], count)
            total = sum(fig.blocks.values())
            usage.add_metric(
                [*self._labels, tier], fig.blocks.get("used", 0) / total if total else 0.0
            )
            lookups.add_metric([*self._labels, tier], fig.lookup_tokens)
            hits.add_metric([*self._labels, tier], fig.hit_tokens)
        yield from (blocks, usage, lookups, hits)
