"""bench/goodput.py's pure parts: the Poisson schedule, SLO and goodput arithmetic on hand-made
records, workload sampling (ShareGPT and fixed mixes), bad input, and the report's schema."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bench.goodput import (
    config_json,
    encoder,
    local_checkpoint,
    main,
    options_from,
    parser,
    result_json,
)
from bench.goodput_cluster import ClusterInfo, cluster_config, read_spec, spec_info
from bench.goodput_metrics import (
    GoodputInputError,
    RequestRecord,
    Slo,
    goodput_rps,
    per_device,
    percentiles,
    summarize_rate,
)
from bench.goodput_plot import matplotlib_missing, png_path
from bench.goodput_report import comparison, write_outputs
from bench.goodput_workloads import (
    ModelLimits,
    build_workload,
    conversation_pairs,
    iter_json_array,
    sample_pairs,
)
from bench.serve import poisson_arrivals
from router.tokenizer import ByteTokenizer
from tests.bench.goodput_schema import check_report

SLO = Slo(ttft_s=1.0, tpot_s=0.1)
LIMITS = ModelLimits(vocab_size=512, max_model_len=1024)
encode = ByteTokenizer().encode


def record(ttft: float | None, e2e: float | None, out: int = 11, **kw: Any) -> RequestRecord:
    return RequestRecord(0.0, 8, out, ttft, e2e, **kw)


def write_spec(tmp_path: Path, name: str, pools: dict[str, Any]) -> str:
    spec = {
        "version": 1,
        "model": {"path": "tiny-random", "max_model_len": 512},
        "node_types": {"local": {"gpus": 0}},
        "pools": {
            p: {"node_type": "local", "num_workers": n, "device": "cpu"} for p, n in pools.items()
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


# --- the schedule -------------------------------------------------------------------------------


def test_poisson_schedule_is_deterministic_per_seed_and_scales_with_rate():
    a = poisson_arrivals(200, 2.0, random.Random(7))
    assert a == poisson_arrivals(200, 2.0, random.Random(7))
    assert a != poisson_arrivals(200, 2.0, random.Random(8))
    assert all(x < y for x, y in zip(a, a[1:]))
    # the same draws at another rate: every arrival scaled by the rate ratio (run_rate relies on it)
    b = poisson_arrivals(200, 4.0, random.Random(7))
    assert b == pytest.approx([x / 2 for x in a])
    gaps = np.diff([0.0, *poisson_arrivals(5000, 2.0, random.Random(0))])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)


# --- SLO and goodput arithmetic ------------------------------------------------------------------


def test_tpot_is_decode_time_over_output_gaps():
    r = record(ttft=0.5, e2e=1.5, out=11)
    assert r.tpot_s == pytest.approx(0.1) and r.finished
    assert r.meets(Slo(0.5, 0.1)) == (True, True)
    assert r.meets(Slo(0.4, 0.09)) == (False, False)
    assert record(None, None, error="boom").tpot_s is None


def test_attainment_counts_unfinished_requests_as_misses():
    records = [
        record(0.5, 1.5),  # both met
        record(2.0, 3.0),  # TTFT missed, TPOT 0.1 met
        record(0.2, 5.2),  # TTFT met, TPOT 0.5 missed
        record(None, None, out=0, error="unfinished at the time limit"),
    ]
    rate = summarize_rate(2.0, records, SLO, duration_s=9.0)
    assert (rate.num_sent, rate.num_finished, rate.num_failed) == (4, 3, 1)
    assert (rate.attainment.ttft, rate.attainment.tpot, rate.attainment.both) == (0.5, 0.5, 0.25)
    assert rate.ttft_s["p50"] == pytest.approx(0.5)  # percentiles over the finished three
    assert rate.tpot_s["p99"] == pytest.approx(np.percentile([0.1, 0.1, 0.5], 99))


def test_percentiles_match_numpy_and_are_none_when_empty():
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {
        "p50": 50.5,
        "p90": pytest.approx(90.1),
        "p99": pytest.approx(99.01),
    }
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def sweep(attainments: dict[float, int]) -> list:
    """Rate -> how many of 10 requests meet both targets."""
    out = []
    for rate, good in attainments.items():
        records = [record(0.5, 1.5)] * good + [record(5.0, 6.0)] * (10 - good)
        out.append(summarize_rate(rate, records, SLO, 1.0))
    return out


def test_goodput_is_the_highest_rate_with_90_percent_meeting_both():
    rates = sweep({1.0: 10, 2.0: 9, 4.0: 8, 8.0: 2})
    assert goodput_rps(rates, 0.9) == 2.0
    assert goodput_rps(rates, 0.8) == 4.0
    assert per_device(goodput_rps(rates, 0.9), 4) == 0.5


def test_no_rate_meets_the_goal_gives_none():
    rates = sweep({1.0: 8, 2.0: 5})
    assert goodput_rps(rates, 0.9) is None and per_device(None, 2) is None
    assert goodput_rps([], 0.9) is None


def test_comparison_ratio_and_missing_goodput():
    rows = comparison(
        [
            {"workload": "a", "mode": "disaggregated", "goodput_rps_per_device": 3.0},
            {"workload": "a", "mode": "colocated", "goodput_rps_per_device": 2.0},
            {"workload": "b", "mode": "disaggregated", "goodput_rps_per_device": 1.0},
            {"workload": "b", "mode": "colocated", "goodput_rps_per_device": None},
        ]
    )
    assert rows[0] == {"workload": "a", "disaggregated": 3.0, "colocated": 2.0, "ratio": 1.5}
    assert rows[1]["ratio"] is None


# --- workloads -----------------------------------------------------------------------------------


def test_fixed_mixes_have_exact_lengths_and_repeat_per_seed():
    w = build_workload("mix-8:1", 5, 0, 16, LIMITS, encode)
    assert [(len(r.prompt_ids), r.max_tokens) for r in w.requests] == [(128, 16)] * 5
    assert w == build_workload("mix-8:1", 5, 0, 16, LIMITS, encode)
    assert w != build_workload("mix-8:1", 5, 1, 16, LIMITS, encode)
    assert all(128 <= t < 512 for r in w.requests for t in r.prompt_ids)
    long = build_workload("long", 2, 0, 16, LIMITS, encode)
    assert (len(long.requests[0].prompt_ids), long.requests[0].max_tokens) == (512, 16)
    with pytest.raises(GoodputInputError, match="--scale"):
        build_workload("mix-1:8", 2, 0, 128, LIMITS, encode)


def test_sharegpt_sampling_is_deterministic_and_fits_the_model():
    first = build_workload("sharegpt", 16, 0, 16, LIMITS, encode)
    assert first == build_workload("sharegpt", 16, 0, 16, LIMITS, encode)
    assert first.requests != build_workload("sharegpt", 16, 1, 16, LIMITS, encode).requests
    assert len(first.requests) == 16
    for r in first.requests:
        assert len(r.prompt_ids) >= 4 and r.max_tokens >= 2
        assert len(r.prompt_ids) + r.max_tokens <= LIMITS.max_model_len


def test_sharegpt_lengths_come_from_the_models_tokenizer():
    encode_hf, name = encoder(None, local_checkpoint("tiny-random"))
    assert name.startswith("hf:") and encoder(None, None)[1] == "bytes"
    w = build_workload("sharegpt", 4, 0, 16, LIMITS, encode_hf)
    assert w == build_workload("sharegpt", 4, 0, 16, LIMITS, encode_hf)
    assert all(t < LIMITS.vocab_size for r in w.requests for t in r.prompt_ids)


def test_sharegpt_file_truncated_tail_and_first_human_turn(tmp_path):
    convs = [
        {
            "conversations": [
                {"from": "gpt", "value": "hi"},
                {"from": "human", "value": "abcd"},
                {"from": "gpt", "value": "xyz!"},
            ]
        },
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"conversations": [{"from": "human", "value": "prompt"}, {"from": "gpt", "value": "ok"}]},
    ]
    text = json.dumps(convs)
    truncated = text[:-1] + ', {"conversations": [{"from": "human", "value": "cut o'
    entries = list(iter_json_array(truncated))
    assert entries == convs
    pairs = conversation_pairs(iter(entries))
    assert pairs == [("abcd", "xyz!"), ("prompt", "ok")]
    got = sample_pairs(pairs, 5, 0, 100, encode)
    assert sorted((bytes(r.prompt_ids), r.max_tokens) for r in got) == [
        (b"abcd", 4),
        (b"prompt", 2),
    ]
    path = tmp_path / "convs.json"
    path.write_text(text)
    assert len(build_workload(str(path), 5, 0, 1, LIMITS, encode).requests) == 2


# --- bad input and the report --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--workloads", "nonsense"], "--workloads"),
        (["--workloads", "/no/such/file.json"], "--workloads"),
        (["--rates", ""], "--rates"),
        (["--rates", " , "], "--rates"),
        (["--rates", "1,-2"], "--rates"),
        (["--ttft-slo-ms", "0"], "--ttft-slo-ms"),
        (["--tpot-slo-ms", "-5"], "--tpot-slo-ms"),
        (["--attainment", "1.5"], "--attainment"),
        (["--requests", "0"], "--requests"),
        (["--compare"], "--compare"),
        (["--workloads", " , "], "--workloads"),
        (["--time-limit", "0"], "--time-limit"),
        (["--tokenizer", "/no/such/dir"], "--tokenizer"),
    ],
)
def test_bad_input_exits_non_zero_naming_the_flag(tmp_path, capsys, flags, field):
    spec = write_spec(tmp_path, "disagg", {"prefill": 1, "decode": 1})
    assert main(["--spec", spec, "--out", str(tmp_path / "r.json"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {field}:") and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_bad_spec_and_missing_target(tmp_path, capsys):
    assert main(["--spec", str(tmp_path / "none.yaml")]) == 2
    assert main([]) == 2
    both = write_spec(tmp_path, "both", {"prefill": 1, "decode": 1, "colocated": 1})
    assert main(["--spec", both]) == 2
    assert "both disaggregated and colocated" in capsys.readouterr().err


def test_spec_maps_onto_a_local_cluster(tmp_path):
    path = write_spec(tmp_path, "colo", {"colocated": 3})
    spec = read_spec(path)
    config = cluster_config(spec)
    assert (config.mode, config.num_colocated, config.use_gpus) == ("colocated", 3, False)
    assert config.pool_engine_kwargs["colocated"]["max_model_len"] == 512
    info = spec_info(path, spec)
    assert (info.mode, info.num_devices, info.device) == ("colocated", 3, "cpu")


def test_report_schema_and_outputs(tmp_path):
    spec = write_spec(tmp_path, "disagg", {"prefill": 1, "decode": 1})
    colo = write_spec(tmp_path, "colo", {"colocated": 2})
    out = tmp_path / "run" / "goodput.json"
    args = ["--spec", spec, "--spec", colo, "--compare", "--rates", "1,2", "--out", str(out)]
    options = options_from(parser().parse_args(args))
    workload = build_workload("mix-1:8", 4, 0, 2, LIMITS, encode)
    results = []
    for name, mode, good in (("disagg", "disaggregated", 10), ("colo", "colocated", 9)):
        info = ClusterInfo(name, mode, "cpu", 2, "tiny-random", {"x": 2}, "s.yaml")
        records = sweep({1.0: 10, 2.0: good})
        results.append(result_json(info, workload, records, options.slo))
    clusters = [dict(info.__dict__, tokenizer="bytes")] * 2
    report = {
        "schema_version": 1,
        "config": config_json(options) | {"workloads": ["mix-1:8"]},
        "clusters": clusters,
        "results": results,
        "comparison": comparison(results),
    }
    check_report(report)
    assert report["comparison"][0]["ratio"] == 1.0  # both reach 2 req/s on 2 devices
    written = write_outputs(report, out)
    assert json.loads(out.read_text()) == report
    if matplotlib_missing() is None:
        assert written[1] == png_path(out, "mix-1:8") and written[1].stat().st_size > 0
    else:
        assert written == [out]
