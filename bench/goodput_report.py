"""The goodput benchmark's output: the JSON, a PNG per workload, tables on stdout, the comparison.

Everything here reads the report dict (bench/goodput.py's docstring gives its schema), so it can
run again on a saved JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import print_table
from bench.goodput_plot import figure_note, matplotlib_missing, write_figures


def comparison(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload: the disaggregated and colocated per-device goodputs and their ratio
    (disaggregated / colocated; None when either is None or colocated's is 0)."""
    by_workload: dict[str, dict[str, float | None]] = {}
    for r in results:
        by_workload.setdefault(r["workload"], {})[r["mode"]] = r["goodput_rps_per_device"]
    rows = []
    for workload, modes in by_workload.items():
        disagg, coloc = modes.get("disaggregated"), modes.get("colocated")
        ratio = disagg / coloc if disagg is not None and coloc else None
        rows.append(
            {"workload": workload, "disaggregated": disagg, "colocated": coloc, "ratio": ratio}
        )
    return rows


def write_outputs(report: dict[str, Any], json_path: Path) -> list[Path]:
    """The JSON at `json_path` and, where matplotlib is installed, one PNG per workload beside
    it (else a note on stdout); returns what was written."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1))
    missing = matplotlib_missing()
    if missing:
        print(f"note: {missing}; re-plot later with bench/goodput_plot.py {json_path}")
        return [json_path]
    return [json_path, *write_figures(report, json_path)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.0f}"


def _rps(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def print_report(report: dict[str, Any]) -> None:
    slo = report["config"]["slo"]
    note = figure_note(report["clusters"])
    rows = []
    for r in report["results"]:
        for rec in r["rates"]:
            t, p, a = rec["ttft_s"], rec["tpot_s"], rec["attainment"]
            rows.append(
                [r["cluster"], r["workload"], f"{rec['rate']:g}", rec["num_sent"]]
                + [rec["num_finished"], *(_ms(t[k]) for k in ("p50", "p90", "p99"))]
                + [*(_ms(p[k]) for k in ("p50", "p90", "p99"))]
                + [f"{a['ttft']:.0%}", f"{a['tpot']:.0%}", f"{a['both']:.0%}"]
            )
    header = ["cluster", "workload", "rate", "sent", "done", "TTFT p50", "p90", "p99"]
    header += ["TPOT p50", "p90", "p99", "att TTFT", "att TPOT", "att both"]
    title = f"{note}; SLO TTFT {slo['ttft_s'] * 1e3:g} ms, TPOT {slo['tpot_s'] * 1e3:g} ms (ms)"
    print_table(title, header, rows)
    goodputs = [
        [r["cluster"], r["workload"], r["num_devices"], _rps(r["goodput_rps"])]
        + [_rps(r["goodput_rps_per_device"])]
        for r in report["results"]
    ]
    print_table(
        f"goodput: highest rate with >= {slo['attainment']:.0%} meeting both targets ({note})",
        ["cluster", "workload", "devices", "goodput req/s", "per device"],
        goodputs,
    )
    if report["comparison"]:
        print_table(
            "disaggregated vs colocated, goodput per device (req/s)",
            ["workload", "disaggregated", "colocated", "ratio"],
            [
                [c["workload"], _rps(c["disaggregated"]), _rps(c["colocated"])]
                + ["-" if c["ratio"] is None else f"{c['ratio']:.2f}"]
                for c in report["comparison"]
            ],
        )
