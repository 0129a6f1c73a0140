"""`tandem plan` (typer): size the pools for a workload, SLOs and a GPU budget; `tandem plan
calibrate`: measure this machine's engine into a profile.

Every user error (an unknown workload or profile, a budget below one worker, SLOs nothing
meets) ends as an `error: ...` message on stderr and a non-zero exit status (1; 2 when no
configuration meets the SLOs, after the closest one is shown). Heavy imports happen inside.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tandem.plan.errors import NoFeasibleConfigError, PlanError

plan_app = typer.Typer(
    help="Plan a cluster: simulate Tandem's router and scheduler to pick P:D and TP sizes.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)


def _tps(text: str) -> list[int]:
    try:
        tps = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise PlanError("tp", f"{text!r} must be comma-separated integers, e.g. 1,2") from None
    if not tps or min(tps) < 1:
        raise PlanError("tp", f"{text!r} needs at least one TP size >= 1")
    return tps


def _fail(exc: PlanError, code: int = 1) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(code)


@plan_app.callback(invoke_without_command=True)
def plan(
    ctx: typer.Context,
    workload: Annotated[
        str,
        typer.Option(
            help="sharegpt, mix:IN:OUT (x --unit tokens) or a .json list of (prompt, output) pairs"
        ),
    ] = "sharegpt",
    unit: Annotated[int, typer.Option(help="tokens per part of a mix:IN:OUT workload")] = 128,
    gpus: Annotated[int, typer.Option(help="GPU budget")] = 8,
    ttft_ms: Annotated[float, typer.Option(help="TTFT target (ms)")] = 400.0,
    tpot_ms: Annotated[float, typer.Option(help="TPOT target (ms)")] = 40.0,
    attainment: Annotated[float, typer.Option(help="share of requests that must meet both")] = 0.9,
    profile: Annotated[
        str, typer.Option(help="a shipped profile name or a profile JSON file")
    ] = "h100-llama3-8b",
    tp: Annotated[str, typer.Option(help="TP sizes to consider, comma-separated")] = "1,2",
    link: Annotated[str, typer.Option(help="the profile's KV link between the pools")] = "nvlink",
    duration: Annotated[float, typer.Option(help="seconds of trace per simulation")] = 20.0,
    seed: Annotated[int, typer.Option(help="seed of every trace")] = 0,
    router_s_per_request: Annotated[
        float | None,
        typer.Option(help="override the profile's router CPU per request (0: no router limit)"),
    ] = None,
    model_path: Annotated[str | None, typer.Option(help="model path written into the spec")] = None,
    out: Annotated[
        Path, typer.Option(help="directory for plan.json, attainment.png, cluster.yaml")
    ] = Path("plan-out"),
) -> None:
    """Search P:D ratios, TP sizes and colocated serving for the best goodput per GPU."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        _run_plan(locals())
    except NoFeasibleConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}\n{exc.closest}", highlight=False)
        raise typer.Exit(2) from None
    except PlanError as exc:
        raise _fail(exc) from None


def _run_plan(opts: dict[str, Any]) -> None:
    from dataclasses import replace

    from tandem.plan import report
    from tandem.plan.cluster import ClusterConfig, SloTargets
    from tandem.plan.planner import plan
    from tandem.plan.profile import load_profile
    from tandem.plan.search import SearchSettings
    from tandem.plan.workload import resolve

    if not (0.0 < opts["attainment"] <= 1.0):
        raise PlanError("attainment", "must be in (0, 1]")
    if opts["ttft_ms"] <= 0 or opts["tpot_ms"] <= 0:
        raise PlanError("ttft_ms", "targets must be > 0 ms")
    prof = load_profile(opts["profile"])
    if opts["router_s_per_request"] is not None:
        prof = replace(prof, router_s_per_request=opts["router_s_per_request"])
    prof.link(opts["link"])
    work = resolve(opts["workload"], prof.max_model_len, opts["unit"])
    slo = SloTargets(opts["ttft_ms"] / 1e3, opts["tpot_ms"] / 1e3, opts["attainment"])
    settings = SearchSettings(duration_s=opts["duration"], seed=opts["seed"])
    base = ClusterConfig(num_colocated=1, link=opts["link"])
    result = plan(prof, work, slo, opts["gpus"], _tps(opts["tp"]), settings, base)
    console.print(report.result_table(result))
    best = result.best
    console.print(
        f"best: [bold]{best.config.describe()}[/bold], {best.per_gpu():.3f} req/s per GPU ({best.score:.2f} req/s in all)"
    )
    console.print(f"should I disaggregate? {result.reason}")
    out_dir: Path = opts["out"]
    out_dir.mkdir(parents=True, exist_ok=True)
    png = report.plot_curves(result, slo, out_dir / "attainment.png")
    model = opts["model_path"] or (
        "tiny-random" if prof.gpu == "cpu" else "/models/Meta-Llama-3-8B"
    )
    spec = report.cluster_spec(best.config, prof, slo, model)
    header = f"Planned by `tandem plan` ({work.name}, {opts['gpus']} GPUs, profile {prof.name}): {best.config.describe()}"
    yaml_path = report.write_spec(out_dir / "cluster.yaml", spec, header)
    (out_dir / "plan.json").write_text(
        json.dumps(report.result_json(result, work.name, prof.name), indent=2)
    )
    rate = result.simulated_requests / max(result.wall_s, 1e-9)
    cpu_rate = result.simulated_requests / max(result.cpu_s, 1e-9)
    console.print(
        f"{result.num_simulations} simulations, {result.simulated_requests} requests in "
        f"{result.wall_s:.1f} s wall, {result.cpu_s:.1f} s CPU ({rate:.0f} simulated requests/s "
        f"of wall time, {cpu_rate:.0f} of CPU time); wrote {png}, {yaml_path}"
    )


@plan_app.command()
def calibrate(
    model: Annotated[
        str, typer.Option(help="model to measure (tiny-random, demo, a path)")
    ] = "tiny-random",
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    max_model_len: Annotated[int, typer.Option(help="context of the measured engine")] = 1024,
    load_format: Annotated[str, typer.Option(help="auto, or dummy to time a shape")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16")] = "auto",
    out: Annotated[Path, typer.Option(help="profile JSON to write")] = Path("profile.json"),
) -> None:
    """Time the real engine's prefill and decode steps here and fit a profile (about a minute)."""
    from tandem.plan.calibrate import calibrate_engine
    from tandem.plan.profile import save_profile

    profile = calibrate_engine(model, device, max_model_len, load_format, dtype)
    save_profile(profile, out)
    costs = profile.tp[1]
    console.print(
        f"wrote {out}: prefill {costs.prefill_seconds(256) * 1e3:.1f} ms at 256 tokens, decode step {costs.decode_seconds(8, 8 * 256) * 1e3:.1f} ms at batch 8"
    )
