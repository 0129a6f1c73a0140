"""`tandem status --watch`: a live terminal view of the cluster, for people without a Grafana.

It shows the figures of the shipped Grafana dashboard, computed the same way from the same
metrics: the router's `GetClusterStatus` lists every Prometheus target (router and workers);
each refresh scrapes them over HTTP and parses the text format with prometheus-client. Rates and
percentiles cover the interval since the previous refresh (the first frame: since start).

    snap = collect("127.0.0.1:50051")        # one ClusterStatus + one scrape of every target
    console.print(render(snap))              # a rich renderable
    watch("127.0.0.1:50051", interval=2.0)   # refresh in place until Ctrl-C

Scrapes that fail leave that target out of the frame and are named in its footer.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tandem.api import generation_pb2 as pb

STAGES = ("router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue", "decode")
SCRAPE_TIMEOUT_S = 2.0
Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class StatusSnapshot:
    """One ClusterStatus and the samples of every target scraped at `taken_at` (monotonic s)."""

    status: pb.ClusterStatus
    samples: dict[str, dict[Labels, float]]  # sample name -> labels -> value, summed over targets
    taken_at: float
    failed_targets: tuple[str, ...] = ()
    worker_samples: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # worker -> "name{k=v}" -> value

    def total(self, name: str, **match: str) -> float:
        """Sum of a sample over every label set that matches `match`."""
        rows = self.samples.get(name, {})
        return sum(
            v
            for labels, v in rows.items()
            if all(dict(labels).get(k) == m for k, m in match.items())
        )

    def by(self, name: str, label: str, **match: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for labels, v in self.samples.get(name, {}).items():
            d = dict(labels)
            if all(d.get(k) == m for k, m in match.items()):
                out[d.get(label, "")] += v
        return dict(out)

    def buckets(self, name: str, **match: str) -> list[tuple[float, float]]:
        """Cumulative (le, count) pairs of a histogram, summed over matching series."""
        acc: dict[float, float] = defaultdict(float)
        for labels, v in self.samples.get(f"{name}_bucket", {}).items():
            d = dict(labels)
            if all(d.get(k) == m for k, m in match.items()):
                acc[float(d["le"])] += v
        return sorted(acc.items())


# -- collection ----------------------------------------------------------------------------------
def _scrape(target: str) -> str:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=SCRAPE_TIMEOUT_S) as resp:
        return resp.read().decode()


def parse_samples(
    texts: Iterable[str],
) -> tuple[dict[str, dict[Labels, float]], dict[str, dict[str, float]]]:
    """Sum samples of several exposition texts by (name, labels); also index per-worker samples."""
    samples: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
    per_worker: dict[str, dict[str, float]] = defaultdict(dict)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[s.name][tuple(sorted(s.labels.items()))] += s.value
                if "worker" in s.labels and "le" not in s.labels:
                    extra = ",".join(
                        f"{k}={v}"
                        for k, v in sorted(s.labels.items())
                        if k not in ("model", "worker", "pool")
                    )
                    per_worker[s.labels["worker"]][f"{s.name}{{{extra}}}"] = s.value
    return {k: dict(v) for k, v in samples.items()}, dict(per_worker)


def collect(address: str, client: object | None = None) -> StatusSnapshot:
    """Ask the router for the cluster status and scrape every metrics target it lists."""
    from tandem.client import Client

    own = client is None
    c = Client(address, timeout=5.0) if client is None else client
    try:
        status = c.cluster_status()  # type: ignore[attr-defined]
    finally:
        if own:
            c.close()  # type: ignore[attr-defined]
    texts, failed = [], []
    for target in status.metrics_targets:
        try:
            texts.append(_scrape(target))
        except OSError:
            failed.append(target)
    samples, per_worker = parse_samples(texts)
    return StatusSnapshot(status, samples, time.monotonic(), tuple(failed), per_worker)


# -- figures -------------------------------------------------------------------------------------
def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative (le, count) pairs; NaN without data."""
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def _delta_buckets(
    now: StatusSnapshot, before: StatusSnapshot | None, name: str, **match: str
) -> list[tuple[float, float]]:
    cur = now.buckets(name, **match)
    if before is None:
        return cur
    old = dict(before.buckets(name, **match))
    return [(le, max(0.0, c - old.get(le, 0.0))) for le, c in cur]


def _delta(now: StatusSnapshot, before: StatusSnapshot | None, name: str, **match: str) -> float:
    return now.total(name, **match) - (before.total(name, **match) if before else 0.0)


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1e3:.1f}"


# -- rendering -----------------------------------------------------------------------------------
def _latency_table(now: StatusSnapshot, before: StatusSnapshot | None) -> Table:
    window = f"last {now.taken_at - before.taken_at:.1f} s" if before else "since start"
    table = Table(title=f"latency (ms), {window}", expand=False)
    for col in ("stage", "p50", "p90", "p99", "mean"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    rows = [(s, "tandem_stage_seconds", {"stage": s}) for s in STAGES] + [
        ("TTFT", "tandem_time_to_first_token_seconds", {}),
        ("TPOT", "tandem_time_per_output_token_seconds", {}),
        ("ITL", "tandem_inter_token_latency_seconds", {}),
        ("end to end", "tandem_end_to_end_seconds", {}),
    ]
    for label, name, match in rows:
        b = _delta_buckets(now, before, name, **match)
        count = _delta(now, before, f"{name}_count", **match)
        mean = _delta(now, before, f"{name}_sum", **match) / count if count else math.nan
        qs = [_ms(histogram_quantile(q, b)) for q in (0.5, 0.9, 0.99)]
        table.add_row(label, *qs, _ms(mean))
    return table


def _requests_table(now: StatusSnapshot, before: StatusSnapshot | None) -> Table:
    dt = now.taken_at - before.taken_at if before else 0.0
    table = Table(title="requests")
    for col in ("figure", "total", "per s"):
        table.add_column(col, justify="right" if col != "figure" else "left")

    def row(label: str, name: str, **match: str) -> None:
        rate = _delta(now, before, name, **match) / dt if dt > 0 else math.nan
        table.add_row(
            label, f"{now.total(name, **match):.0f}", "-" if math.isnan(rate) else f"{rate:.2f}"
        )

    for reason in ("stop", "length", "abort"):
        row(f"finished: {reason}", "tandem_requests_finished_total", finish_reason=reason)
    for reason, value in sorted(now.by("tandem_requests_rejected_total", "reason").items()):
        if value:
            row(f"rejected: {reason}", "tandem_requests_rejected_total", reason=reason)
    for code, value in sorted(now.by("tandem_requests_failed_total", "code").items()):
        if value:
            row(f"failed: {code}", "tandem_requests_failed_total", code=code)
    row("prompt tokens", "tandem_prompt_tokens_total")
    row("generated tokens", "tandem_generation_tokens_total")
    row("KV bytes received", "tandem_kv_transfer_bytes_total")
    row("KV transfer failures", "tandem_kv_transfer_failures_total")
    return table


def _slo_table(now: StatusSnapshot, before: StatusSnapshot | None) -> Table:
    table = Table(title="SLO classes")
    for col in ("class", "attained", "judged", "attainment", "goodput tok"):
        table.add_column(col, justify="right" if col != "class" else "left")
    judged = now.by("tandem_slo_requests_total", "slo_class")
    for cls in sorted(judged):
        met = now.by("tandem_slo_attained_total", "slo_class").get(cls, 0.0)
        good = now.by("tandem_goodput_tokens_total", "slo_class").get(cls, 0.0)
        ratio = f"{met / judged[cls]:.1%}" if judged[cls] else "-"
        table.add_row(cls, f"{met:.0f}", f"{judged[cls]:.0f}", ratio, f"{good:.0f}")
    return table


def _workers_table(now: StatusSnapshot) -> Table:
    """Health and load per worker; KV figures are in `_kv_table` (one table of both needs ~110
    columns, and an 80-column terminal would squeeze every cell to an ellipsis)."""
    table = Table(title="workers (queued: prompt tokens waiting for prefill)")
    table.add_column("worker", no_wrap=True)
    table.add_column("pool", no_wrap=True)
    for col in ("healthy", "running", "waiting", "queued", "preempt"):
        table.add_column(col, justify="right", no_wrap=True)
    for w in now.status.workers:
        samples = now.worker_samples.get(w.worker_id, {})
        preempt = samples.get("tandem_engine_preemptions_total{}", 0.0)
        healthy = Text("yes", style="green") if w.healthy else Text("NO", style="bold red")
        table.add_row(
            w.worker_id,
            w.pool,
            healthy,
            str(w.load.running),
            str(w.load.waiting),
            str(w.load.queued_prefill_tokens),
            f"{preempt:.0f}",
        )
    return table


def _kv_table(now: StatusSnapshot) -> Table:
    """HBM KV blocks per worker (used, cached for prefix reuse, free) and the prefix hit rate."""
    table = Table(title="KV cache (blocks)")
    table.add_column("worker", no_wrap=True)
    for col in ("used", "cached", "free", "hit rate"):
        table.add_column(col, justify="right", no_wrap=True)
    for w in now.status.workers:
        s = now.worker_samples.get(w.worker_id, {})
        lookups = s.get("tandem_kv_lookup_tokens_total{tier=hbm}", 0.0)
        hits = s.get("tandem_kv_hit_tokens_total{tier=hbm}", 0.0)
        used = w.load.total_kv_blocks - w.load.free_kv_blocks
        table.add_row(
            w.worker_id,
            f"{s.get('tandem_kv_blocks{state=used,tier=hbm}', used):.0f}",
            f"{s.get('tandem_kv_blocks{state=cached,tier=hbm}', 0.0):.0f}",
            f"{s.get('tandem_kv_blocks{state=free,tier=hbm}', w.load.free_kv_blocks):.0f}",
            f"{hits / lookups:.1%}" if lookups else "-",
        )
    return table


def render(status: StatusSnapshot, previous: StatusSnapshot | None = None) -> RenderableType:
    """The whole view: latency by stage, requests, SLO classes, workers; rates since `previous`."""
    queue = status.total("tandem_router_queue_requests")
    inflight = status.total("tandem_router_inflight_prefills")
    head = Text(
        f"Tandem: {len(status.status.workers)} workers, router queue {queue:.0f}, "
        f"in-flight prefills {inflight:.0f}",
        style="bold",
    )
    parts: list[RenderableType] = [
        head,
        _latency_table(status, previous),
        _requests_table(status, previous),
        _slo_table(status, previous),
        _workers_table(status),
        _kv_table(status),
    ]
    if status.failed_targets:
        parts.append(
            Text(f"unreachable metrics targets: {', '.join(status.failed_targets)}", style="yellow")
        )
    return Group(*parts)


def watch(
    address: str,
    interval: float = 2.0,
    console: Console | None = None,
    iterations: int | None = None,
    api_key: str | None = None,
) -> None:
    """Refresh the view every `interval` seconds (until Ctrl-C, or `iterations` frames)."""
    from tandem.client import Client

    client = Client(address, timeout=5.0, api_key=api_key)
    previous: StatusSnapshot | None = None
    frames = 0
    try:
        with Live(console=console or Console(), refresh_per_second=4, screen=False) as live:
            while iterations is None or frames < iterations:
                snap = collect(address, client)
                live.update(render(snap, previous))
                previous, frames = snap, frames + 1
                if iterations is None or frames < iterations:
                    time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
