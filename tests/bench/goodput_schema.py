"""The goodput report's schema (bench/goodput.py's docstring), checked key by key: shared by the
pure tests and the end-to-end run."""

from __future__ import annotations

from typing import Any

REPORT_KEYS = {"schema_version", "config", "clusters", "results", "comparison"}
CONFIG_KEYS = {"workloads", "rates", "num_requests", "time_limit_s", "drain_s", "seed", "scale"}
CONFIG_KEYS |= {"slo", "command", "host"}
CLUSTER_KEYS = {"name", "mode", "device", "num_devices", "model", "workers", "spec", "tokenizer"}
RESULT_KEYS = {"cluster", "mode", "workload", "workload_source", "num_devices", "goodput_rps"}
RESULT_KEYS |= {"goodput_rps_per_device", "rates"}
RATE_KEYS = {"rate", "num_sent", "num_finished", "num_failed", "duration_s", "ttft_s", "tpot_s"}
RATE_KEYS |= {"attainment", "requests"}
REQUEST_KEYS = {"arrival_s", "prompt_tokens", "output_tokens", "ttft_s", "e2e_s", "tpot_s", "error"}
PERCENTILE_KEYS = {"p50", "p90", "p99"}


def check_report(report: dict[str, Any]) -> None:
    assert set(report) == REPORT_KEYS and report["schema_version"] == 1
    assert set(report["config"]) == CONFIG_KEYS
    assert set(report["config"]["slo"]) == {"ttft_s", "tpot_s", "attainment"}
    for cluster in report["clusters"]:
        assert set(cluster) == CLUSTER_KEYS
    for result in report["results"]:
        assert set(result) == RESULT_KEYS
        for rate in result["rates"]:
            assert set(rate) == RATE_KEYS
            assert set(rate["ttft_s"]) == set(rate["tpot_s"]) == PERCENTILE_KEYS
            assert set(rate["attainment"]) == {"ttft", "tpot", "both"}
            for request in rate["requests"]:
                assert set(request) == REQUEST_KEYS
    for row in report["comparison"]:
        assert set(row) == {"workload", "disaggregated", "colocated", "ratio"}
