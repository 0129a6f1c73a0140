"""A real Prometheus scrapes a live local cluster (Ray actors, the gRPC router, the demo model on
CPU) found through the cluster's file-SD list, under a scripted workload; its HTTP API then
answers: counters equal the workload's tallies exactly, every stage's quantile is finite, every
dashboard and alert expression is valid and names only scraped metrics, and the number of
series does not grow with 500 more distinct requests. Tests run in file order (module state).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from dataclasses import dataclass, field

import grpc
import pytest
from rich.console import Console

from router.metrics import STAGES
from tandem.api import generation_pb2 as pb
from tandem.client import AsyncClient, Slo, TandemClientError
from tandem.cluster import ClusterConfig
from tandem.status_view import collect, histogram_quantile, render
from tests.cluster.cluster_harness import ClusterThread
from tests.e2e.deploy_exprs import (
    RULE_FILES,
    SCRAPE_CONFIG,
    dashboard_exprs,
    metric_names,
    rule_exprs,
    to_promql,
)
from tests.e2e.prometheus_server import PrometheusServer, ensure_prometheus, wait_for

pytestmark = pytest.mark.timeout(600)
NUM_LENGTH = 6
NUM_STOP = 3
NUM_SLO_REJECTS = 3
NUM_INVALID = 2
NUM_DISTINCT = 500


@dataclass
class Tally:
    finished: dict[str, int] = field(default_factory=lambda: {"stop": 0, "length": 0, "abort": 0})
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decoded: int = 0  # requests that went on to a decode worker (one KV transfer each)
    finals: list[pb.GenerateResponse] = field(default_factory=list)

    def add(self, prompt_len: int, tokens: int, final: pb.GenerateResponse) -> None:
        reason = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}.get(
            final.finish_reason, "abort"
        )
        self.finished[reason] += 1
        self.prompt_tokens += prompt_len
        self.generated_tokens += tokens
        self.decoded += int(final.timings.HasField("kv_transfer"))
        self.finals.append(final)
        assert final.prompt_tokens == prompt_len and final.completion_tokens == tokens


def _prompt(seed: int, length: int) -> list[int]:
    return [3 + (seed * 31 + j * 7) % 200 for j in range(length)]


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    return ensure_prometheus()


@pytest.fixture(scope="module")
def cluster(prometheus_binary: str, tmp_path_factory: pytest.TempPathFactory) -> ClusterThread:
    sd_path = tmp_path_factory.mktemp("sd") / "prometheus_sd.json"
    config = ClusterConfig(
        num_prefill=1, num_decode=1, engine_kwargs={"device": "cpu"}, metrics_sd_path=str(sd_path)
    )
    c = ClusterThread(config)
    yield c
    c.close()


@pytest.fixture(scope="module")
def prom(
    prometheus_binary: str, cluster: ClusterThread, tmp_path_factory: pytest.TempPathFactory
) -> PrometheusServer:
    assert cluster.cluster.sd_path is not None
    server = PrometheusServer(
        prometheus_binary, tmp_path_factory.mktemp("prom"), cluster.cluster.sd_path, RULE_FILES
    )
    try:
        wait_for(
            lambda: server.value('count(up{job="tandem"} == 1)') == 3, 30, "3 tandem targets up"
        )
        yield server
    finally:
        server.stop()


async def _run(client: AsyncClient, prompt: list[int], **kwargs) -> tuple[int, pb.GenerateResponse]:
    tokens, final = await _tokens(client, prompt, **kwargs)
    return len(tokens), final


async def _tokens(
    client: AsyncClient, prompt: list[int], **kwargs
) -> tuple[list[int], pb.GenerateResponse]:
    tokens: list[int] = []
    final = None
    async for msg in client.generate(prompt, **kwargs):
        tokens.extend(msg.token_ids)
        final = msg
    assert final is not None
    return tokens, final


async def _scripted(address: str) -> tuple[Tally, int, int]:
    """Served requests are best-effort (never refused on a loaded CI machine); the SLO rejects are not."""
    tally = Tally()
    async with AsyncClient(address) as client:
        for i in range(NUM_STOP):  # sequential, < 1 block: no prefix hit changes the greedy result
            prompt = _prompt(100 + i, 12)
            tokens, probe = await _tokens(
                client, prompt, temperature=0.0, max_tokens=8, ignore_eos=True, best_effort=True
            )
            tally.add(len(prompt), len(tokens), probe)
            stop_token = next(t for k, t in enumerate(tokens) if k >= 2 and t not in tokens[:k])
            n, final = await _run(
                client,
                prompt,
                temperature=0.0,
                max_tokens=8,
                stop_token_ids=[stop_token],
                best_effort=True,
            )
            assert final.finish_reason == pb.FINISH_REASON_STOP, final
            tally.add(len(prompt), n, final)
        lengths = [20 + i for i in range(NUM_LENGTH)]
        runs = [
            _run(
                client,
                _prompt(i, n),
                temperature=0.7,
                seed=i,
                max_tokens=6,
                ignore_eos=True,
                best_effort=True,
            )
            for i, n in enumerate(lengths)
        ]
        for n_prompt, (n, final) in zip(lengths, await asyncio.gather(*runs)):
            assert final.finish_reason == pb.FINISH_REASON_LENGTH and n == 6
            tally.add(n_prompt, n, final)
        n, final = await _run(
            client, _prompt(7, 9), max_tokens=1, best_effort=True
        )  # ends at the prefill worker
        tally.add(9, n, final)
        slo_rejects = await _expect_errors(
            client,
            NUM_SLO_REJECTS,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            _prompt(1, 300),
            slo=Slo(ttft_ms=0.001),
        )
        invalid = await _expect_errors(
            client, NUM_INVALID, grpc.StatusCode.INVALID_ARGUMENT, _prompt(2, 5), temperature=-1.0
        )
    return tally, slo_rejects, invalid


async def _expect_errors(
    client: AsyncClient, count: int, code: grpc.StatusCode, prompt: list[int], **kwargs
) -> int:
    for _ in range(count):
        with pytest.raises(TandemClientError) as err:
            await _run(client, prompt, **kwargs)
        assert err.value.code == code, err.value
    return count


@pytest.fixture(scope="module")
def workload(cluster: ClusterThread, prom: PrometheusServer) -> tuple[Tally, int, int]:
    tally, slo_rejects, invalid = asyncio.run(_scripted(cluster.address))
    total = sum(tally.finished.values())
    prom.wait_value("sum(tandem_requests_finished_total)", total)
    prom.wait_value("sum(tandem_kv_transfers_total)", tally.decoded)
    # The rejections come last in the script: once a scrape holds them, it holds every earlier
    # router figure too (a scrape between the last finish and the rejects once failed this module).
    prom.wait_value("sum(tandem_requests_rejected_total)", slo_rejects + invalid)
    return tally, slo_rejects, invalid


def test_counters_match_the_workload_exactly(
    prom: PrometheusServer, workload: tuple[Tally, int, int]
) -> None:
    tally, slo_rejects, invalid = workload
    for reason, count in tally.finished.items():
        assert (
            prom.value(f'sum(tandem_requests_finished_total{{finish_reason="{reason}"}})') == count
        ), reason
    assert prom.value('sum(tandem_requests_rejected_total{reason="slo_infeasible"})') == slo_rejects
    assert prom.value('sum(tandem_requests_rejected_total{reason="invalid_argument"})') == invalid
    assert prom.value("sum(tandem_requests_rejected_total)") == slo_rejects + invalid
    assert prom.value("sum(tandem_prompt_tokens_total)") == tally.prompt_tokens
    assert prom.value("sum(tandem_generation_tokens_total)") == tally.generated_tokens
    served = sum(tally.finished.values())
    assert (
        prom.value('sum(tandem_slo_requests_total{slo_class="interactive"})')
        == served + slo_rejects
    )
    assert prom.value("sum(tandem_kv_transfers_total)") == tally.decoded
    assert prom.value("sum(tandem_kv_transfer_bytes_total)") > 0
    assert prom.value("sum(tandem_requests_failed_total)") == 0
    itl_count = sum(max(0, f.completion_tokens - 1) for f in tally.finals)
    assert prom.value("sum(tandem_inter_token_latency_seconds_count)") == itl_count


def test_every_stage_quantile_is_finite(
    prom: PrometheusServer, workload: tuple[Tally, int, int]
) -> None:
    for stage in STAGES:
        for q in (0.5, 0.99):
            expr = f'histogram_quantile({q}, sum by (le) (rate(tandem_stage_seconds_bucket{{stage="{stage}"}}[5m])))'
            assert math.isfinite(prom.value(expr)), expr
    for name in (
        "time_to_first_token",
        "inter_token_latency",
        "time_per_output_token",
        "end_to_end",
        "engine_step",
    ):
        expr = f"histogram_quantile(0.9, sum by (le) (rate(tandem_{name}_seconds_bucket[5m])))"
        assert math.isfinite(prom.value(expr)), expr
    assert prom.value('sum(tandem_engine_batch_tokens_count{pool="prefill"})') > 0
    assert prom.value('sum(tandem_engine_batch_tokens_count{pool="decode"})') > 0
    assert prom.value('sum(tandem_kv_blocks{tier="hbm"})') > 0


def test_status_view_shows_the_figures_prometheus_has(
    prom: PrometheusServer, cluster: ClusterThread, workload: tuple[Tally, int, int]
) -> None:
    snap = collect(cluster.address)
    assert not snap.failed_targets and len(snap.status.metrics_targets) == 3
    assert snap.total("tandem_requests_finished_total") == prom.value(
        "sum(tandem_requests_finished_total)"
    )
    assert snap.total("tandem_generation_tokens_total") == prom.value(
        "sum(tandem_generation_tokens_total)"
    )
    for stage in STAGES:
        ours = histogram_quantile(0.9, snap.buckets("tandem_stage_seconds", stage=stage))
        theirs = prom.value(
            f'histogram_quantile(0.9, sum by (le) (tandem_stage_seconds_bucket{{stage="{stage}"}}))'
        )
        assert ours == pytest.approx(theirs), stage
    console = Console(record=True, width=200)
    console.print(render(snap))
    text = console.export_text()
    assert all(w in text for w in ("prefill-0", "decode-0", "kv_transfer", "interactive")), text


def test_stage_timings_add_up_to_end_to_end(workload: tuple[Tally, int, int]) -> None:
    tally = workload[0]
    for final in tally.finals:
        t = final.timings
        total = sum(getattr(t, s) for s in STAGES if t.HasField(s))
        assert abs(total - t.end_to_end) <= 0.05 * t.end_to_end, (total, t)
        if t.HasField("kv_transfer"):
            assert all(t.HasField(s) for s in STAGES) and t.prefill > 0 and t.decode > 0


def test_dashboard_and_alert_expressions_run_and_name_scraped_metrics(
    prom: PrometheusServer, workload: tuple[Tally, int, int]
) -> None:
    exprs = [to_promql(e) for e in dashboard_exprs()] + rule_exprs()
    for expr in exprs:
        prom.query(expr)  # raises with Prometheus' parse or execution error
    for name in sorted(metric_names(exprs)):
        assert prom.query(f'count({{__name__="{name}"}})'), f"{name} is used but not in the scrape"
    rules = wait_for(lambda: _evaluated_rules(prom), 15, "every alert rule evaluated")
    assert len(rules) == len(rule_exprs())
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    if shutil.which("promtool"):
        for path in [*RULE_FILES]:
            check = subprocess.run(
                ["promtool", "check", "rules", str(path)], capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
        check = subprocess.run(
            ["promtool", "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stdout + check.stderr


def _evaluated_rules(prom: PrometheusServer) -> list[dict]:
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    return (
        rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []
    )


async def _distinct_requests(address: str, count: int, concurrency: int = 16) -> int:
    tokens = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(client: AsyncClient, i: int) -> None:
        nonlocal tokens
        async with gate:
            n, _ = await _run(
                client,
                _prompt(1000 + i, 6 + i % 11),
                request_id=f"bound-{i:04d}",
                slo="batch",
                best_effort=True,
                temperature=0.5,
                seed=i,
                max_tokens=2,
                ignore_eos=True,
            )
            tokens += n

    async with AsyncClient(address) as client:
        await asyncio.gather(*(one(client, i) for i in range(count)))
    return tokens


def test_series_stay_bounded_after_500_distinct_requests(
    prom: PrometheusServer, cluster: ClusterThread, workload: tuple[Tally, int, int]
) -> None:
    series = 'count({__name__=~"tandem_.+"})'
    before_total = prom.value("sum(tandem_requests_finished_total)")
    prom.wait_value(series, prom.value(series))  # a settled count
    before = prom.value(series)
    generated = prom.value("sum(tandem_generation_tokens_total)")
    tokens = asyncio.run(_distinct_requests(cluster.address, NUM_DISTINCT))
    prom.wait_value(
        "sum(tandem_requests_finished_total)", before_total + NUM_DISTINCT, timeout_s=30
    )
    prom.wait_value("sum(tandem_generation_tokens_total)", generated + tokens)
    assert prom.value(series) == before, "the number of series grew with the number of requests"
    assert before < 2000
    for label in prom.api("labels"):
        values = prom.api(f"label/{label}/values")
        assert not [v for v in values if "bound-" in v], f"label {label} holds request ids"
