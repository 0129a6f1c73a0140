"""bench/router.py's report: slices of a phase merge into one result, and the router is printed
against the bare servicer of the same run as issue 24's two ratios."""

from __future__ import annotations

import pytest

from bench.router import PhaseResult, merge, print_table


def _phase(name: str, streams: int, seconds: float, latency_s: float, n: int) -> PhaseResult:
    return PhaseResult(
        name, streams, seconds, [latency_s] * n, [latency_s / 2] * n, 6 * n, 16 * n, 0
    )


def test_slices_merge_into_one_phase() -> None:
    merged = merge([_phase("throughput", 64, 2.0, 0.1, 10), _phase("throughput", 64, 3.0, 0.2, 5)])
    assert (merged.name, merged.concurrency, merged.seconds) == ("throughput", 64, 5.0)
    assert sorted(merged.latencies_s) == [0.1] * 10 + [0.2] * 5
    assert (merged.messages, merged.tokens, merged.errors) == (90, 240, 0)


def test_the_router_is_printed_against_the_floor(capsys: pytest.CaptureFixture[str]) -> None:
    results = [
        _phase("latency", 1, 6.0, 0.003, 100),
        _phase("floor-lat", 1, 6.0, 0.002, 200),
        _phase("throughput", 64, 6.0, 0.1, 900),
        _phase("floor-thr", 64, 6.0, 0.05, 1000),
    ]
    print_table(results, 16)
    out = capsys.readouterr().out
    assert "router vs floor at 64 streams: req/s x0.90 (target >= x0.80): MET" in out
    assert "router vs floor at 1 stream: added p50 x1.50 (target <= x1.50): MET" in out
