"""bench/goodput.py end to end: a real tiny CPU cluster (a LocalCluster on a real Ray, started by
the benchmark from a spec, in its own process), 2 rates x 4 requests; the JSON and the figure
exist and the numbers are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from bench.goodput_plot import matplotlib_missing, png_path
from tests.bench.goodput_schema import check_report

REPO = Path(__file__).resolve().parents[2]
RATES = [2.0, 4.0]
NUM_REQUESTS = 4


def test_goodput_sweep_against_a_real_cpu_cluster(tmp_path):
    engine = {"max_num_seqs": 8, "max_num_batched_tokens": 512}
    pool = {"node_type": "local", "num_workers": 1, "device": "cpu", "engine": engine}
    spec = {
        "version": 1,
        "model": {"path": "tiny-random", "max_model_len": 256},
        "node_types": {"local": {"gpus": 0}},
        "pools": {"prefill": pool, "decode": pool},
        "kv": {"transport": "grpc"},
    }
    spec_path = tmp_path / "cpu-disagg.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "goodput.json"
    command = [sys.executable, str(REPO / "bench" / "goodput.py"), "--spec", str(spec_path)]
    command += ["--workloads", "mix-8:1", "--rates", ",".join(map(str, RATES)), "--scale", "4"]
    command += ["--requests", str(NUM_REQUESTS), "--time-limit", "10", "--drain", "30"]
    command += ["--ttft-slo-ms", "5000", "--tpot-slo-ms", "1000", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    check_report(report)
    (result,) = report["results"]
    assert result["num_devices"] == 2 and result["mode"] == "disaggregated"
    assert [r["rate"] for r in result["rates"]] == RATES
    for rate in result["rates"]:
        assert rate["num_sent"] == rate["num_finished"] == NUM_REQUESTS  # 10 s of arrivals
        for req in rate["requests"]:
            assert req["prompt_tokens"] == 32 and req["output_tokens"] == 4
            assert 0 < req["ttft_s"] < req["e2e_s"] < 30 and req["tpot_s"] > 0
        assert 0 < rate["ttft_s"]["p50"] <= rate["ttft_s"]["p90"] <= rate["ttft_s"]["p99"]
        assert 0 <= rate["attainment"]["both"] <= 1
    assert result["goodput_rps"] in (None, *RATES)
    if result["goodput_rps"] is not None:
        assert result["goodput_rps_per_device"] == result["goodput_rps"] / 2
    figure = png_path(out, "mix-8:1")
    if matplotlib_missing() is None:
        assert figure.stat().st_size > 0
    else:  # matplotlib is optional: the run says so instead of failing
        assert "matplotlib is not installed" in done.stdout and not figure.exists()
