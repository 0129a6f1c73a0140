"""What `tandem plan` shows and writes: a rich table, the attainment plot, the cluster spec.

The spec is `deploy/`-style YAML that `tandem.spec.load_spec` (hence `tandem launch`) accepts:
the chosen pools with their TP sizes and the engine limits the simulation ran with, one node
type of `gpus_per_node` GPUs, and an SLO class with the planned targets as the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from tandem.plan.cluster import ClusterConfig, EngineLimits, SloTargets
from tandem.plan.png import line_chart
from tandem.plan.profile import CostProfile
from tandem.plan.search import PlanResult


def result_table(result: PlanResult) -> Table:
    table = Table(title=f"tandem plan: {result.budget} GPUs")
    for name in ("configuration", "GPUs", "goodput req/s", "per GPU", "how"):
        table.add_column(name, justify="left" if name in ("configuration", "how") else "right")
    for c in sorted(result.candidates, key=lambda c: -c.per_gpu()):
        mark = " (best)" if c is result.best else ""
        table.add_row(
            c.config.describe() + mark,
            str(c.config.num_gpus),
            f"{c.score:.2f}",
            f"{c.per_gpu():.3f}",
            c.note or "phase estimate",
        )
    return table


def plot_curves(result: PlanResult, slo: SloTargets, path: Path) -> Path:
    """SLO attainment against request rate per GPU, one line per configuration (PNG; without
    matplotlib a plain chart from `png.line_chart`, series in `result.curves` order)."""
    try:
        import matplotlib
    except ImportError:
        return line_chart(list(result.curves.values()), slo.attainment, path)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in result.curves.items():
        ax.plot([r for r, _ in points], [a * 100 for _, a in points], marker="o", label=name)
    ax.axhline(
        slo.attainment * 100, color="grey", linestyle="--", label=f"{slo.attainment:.0%} target"
    )
    ax.set_xlabel("request rate per GPU (req/s)")
    ax.set_ylabel("requests meeting TTFT and TPOT (%)")
    ax.set_title(f"SLO attainment: TTFT {slo.ttft_s * 1e3:.0f} ms, TPOT {slo.tpot_s * 1e3:.0f} ms")
    ax.set_ylim(0, 105)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pool(
    workers: int, tp: int, limits: EngineLimits, block_size: int, device: str
) -> dict[str, Any]:
    return {
        "node_type": "gpu_node" if device == "cuda" else "cpu_node",
        "num_workers": workers,
        "tensor_parallel_size": tp,
        "device": device,
        "engine": {
            "max_num_seqs": limits.max_num_seqs,
            "max_num_batched_tokens": limits.max_num_batched_tokens,
            "block_size": block_size,
        },
    }


def cluster_spec(
    config: ClusterConfig,
    profile: CostProfile,
    slo: SloTargets,
    model_path: str,
    gpus_per_node: int = 8,
) -> dict[str, Any]:
    """The spec for `config` as a plain mapping (see the module docstring)."""
    device = "cpu" if profile.gpu == "cpu" else "cuda"
    bs = profile.block_size
    if config.colocated:
        pools = {
            "colocated": _pool(
                config.num_colocated, config.colocated_tp, config.colocated_limits, bs, device
            )
        }
    else:
        pools = {
            "prefill": _pool(
                config.num_prefill, config.prefill_tp, config.prefill_limits, bs, device
            ),
            "decode": _pool(config.num_decode, config.decode_tp, config.decode_limits, bs, device),
        }
    node = {"gpus": gpus_per_node} if device == "cuda" else {"gpus": 0}
    return {
        "version": 1,
        "model": {"path": model_path, "max_model_len": profile.max_model_len},
        "node_types": {"head": {"gpus": 0}, ("gpu_node" if device == "cuda" else "cpu_node"): node},
        "pools": pools,
        "kv": {"transport": "auto" if device == "cuda" else "grpc"},
        "slo_classes": {"planned": {"ttft_ms": slo.ttft_s * 1e3, "tpot_ms": slo.tpot_s * 1e3}},
        "router": {"default_slo_class": "planned"},
    }


def write_spec(path: Path, spec: dict[str, Any], header: str) -> Path:
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + yaml.safe_dump(spec, sort_keys=False))
    return path


def result_json(result: PlanResult, workload: str, profile: str) -> dict[str, Any]:
    """The plan as plain JSON (every candidate, the phase goodputs, the curves)."""
    return {
        "workload": workload,
        "profile": profile,
        "budget_gpus": result.budget,
        "best": result.best.config.describe(),
        "best_goodput_per_gpu": result.best.per_gpu(),
        "reason": result.reason,
        "candidates": [
            {
                "config": c.config.describe(),
                "gpus": c.config.num_gpus,
                "estimate": c.estimate,
                "goodput": c.goodput,
                "note": c.note,
            }
            for c in result.candidates
        ],
        "phase_goodput_per_worker": result.phase_goodput,
        "curves": {k: [list(p) for p in v] for k, v in result.curves.items()},
        "simulations": result.num_simulations,
        "simulated_requests": result.simulated_requests,
        "wall_s": result.wall_s,
        "cpu_s": result.cpu_s,
    }
