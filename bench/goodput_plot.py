"""The goodput benchmark's figures: one PNG per workload, every cluster of the run overlaid.

Three panels against request rate (log2 axis): SLO attainment (both targets solid, TTFT dashed,
TPOT dotted, the attainment goal as a grey line), TTFT P50/P90/P99 and TPOT P50/P90/P99 (log
axes, the SLO as a grey line). The title names the device kind and model (a CPU run with the tiny model says so on the
figure). Input is the report dict (bench/goodput.py's docstring gives the schema), so a saved run
can be re-plotted: `python bench/goodput_plot.py RUN.json` writes RUN-<workload>.png beside it.

matplotlib (Agg backend: no display needed) is imported only when figures are drawn, and is an
optional dependency: `matplotlib_missing()` says why figures cannot be drawn (None: they can).
This module imports neither torch nor the cluster, so any Python with matplotlib can re-plot.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

PERCENTILE_MARKERS = {"p50": "o", "p90": "s", "p99": "^"}
ATTAINMENT_STYLES = {"both": "-", "ttft": "--", "tpot": ":"}


def matplotlib_missing() -> str | None:
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed: no figures (pip install matplotlib)"
    return None


def figure_note(clusters: list[dict[str, Any]]) -> str:
    """ "CPU, model tiny-random": the device kinds and models of the run, for every figure."""
    devices = sorted({c["device"].upper() for c in clusters})
    models = sorted({c["model"] for c in clusters})
    return f"{'/'.join(devices)}, model {', '.join(models)}"


def png_path(json_path: Path, workload: str) -> Path:
    """RUN-<workload>.png beside RUN.json (a workload file contributes its stem)."""
    name = Path(workload).stem if "/" in workload else workload
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return json_path.with_name(f"{json_path.stem}-{safe}.png")


def write_figures(report: dict[str, Any], json_path: Path) -> list[Path]:
    """One PNG per workload of `report` beside `json_path`; needs matplotlib."""
    note = figure_note(report["clusters"])
    return [
        plot_workload(w, report["results"], report["config"], note, png_path(json_path, w))
        for w in report["config"]["workloads"]
    ]


def plot_workload(
    workload: str, results: list[dict[str, Any]], config: dict[str, Any], note: str, path: Path
) -> Path:
    """Write `path` (a PNG) for the `results` entries of `workload`; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    slo = config["slo"]
    for i, result in enumerate(r for r in results if r["workload"] == workload):
        color = f"C{i}"
        rates = [rec["rate"] for rec in result["rates"]]
        _attainment(axes[0], result, rates, color)
        _percentiles(axes[1], result, rates, "ttft_s", color)
        _percentiles(axes[2], result, rates, "tpot_s", color)
    axes[0].axhline(slo["attainment"], color="grey", linewidth=0.8)
    axes[1].axhline(slo["ttft_s"] * 1e3, color="grey", linewidth=0.8)
    axes[2].axhline(slo["tpot_s"] * 1e3, color="grey", linewidth=0.8)
    for ax in axes[1:]:
        ax.set_yscale("log")  # a queueing tail is orders above the median
    _label(axes[0], "SLO attainment", "fraction of requests")
    _label(axes[1], "TTFT percentiles (SLO grey)", "ms (log)")
    _label(axes[2], "TPOT percentiles (SLO grey)", "ms (log)")
    fig.suptitle(f"{workload}: goodput sweep ({note})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _attainment(ax: Any, result: dict[str, Any], rates: list[float], color: str) -> None:
    for key, style in ATTAINMENT_STYLES.items():
        values = [rec["attainment"][key] for rec in result["rates"]]
        ax.plot(rates, values, style, color=color, marker=".", label=f"{result['cluster']} {key}")
    ax.set_ylim(-0.05, 1.05)


def _percentiles(ax: Any, result: dict[str, Any], rates: list[float], key: str, color: str) -> None:
    for pct, marker in PERCENTILE_MARKERS.items():
        points = [
            (rate, rec[key][pct] * 1e3)
            for rate, rec in zip(rates, result["rates"])
            if rec[key][pct] is not None
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, "-", color=color, marker=marker, label=f"{result['cluster']} {pct}")


def _label(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)  # swept rates are usually doubled
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_major_formatter(plain)
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("request rate (req/s, log)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main(argv: list[str]) -> int:
    """Re-plot a saved run: `python bench/goodput_plot.py RUN.json`."""
    if len(argv) != 1 or not Path(argv[0]).is_file():
        print("usage: goodput_plot.py RUN.json (a bench/goodput.py report)", file=sys.stderr)
        return 2
    missing = matplotlib_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    path = Path(argv[0])
    for png in write_figures(json.loads(path.read_text()), path):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
