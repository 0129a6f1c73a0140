"""Goodput under SLOs, DistServe-style: Poisson load swept over request rates against a real cluster.

    python bench/goodput.py --spec deploy/x.yaml --workloads mix-8:1,sharegpt --rates 1,2,4 \\
        --requests 64 --time-limit 60 --ttft-slo-ms 1000 --tpot-slo-ms 100 --out run/goodput.json
    python bench/goodput.py --spec disagg.yaml --spec colocated.yaml --compare ...
    python bench/goodput.py --address 127.0.0.1:50051 [--devices 2] ...

A cluster is started from each `--spec` (bench/goodput_cluster.py: a `deploy/`-style spec run as
a LocalCluster on this machine, loopback only) or is the one serving at `--address`. For each
workload (bench/goodput_workloads.py) and rate (bench/goodput_sweep.py): TTFT and TPOT per
request, their P50/P90/P99, SLO attainment, and goodput = the highest swept rate at which >=
`--attainment` (0.9) of requests meet both targets, per device (GPUs; CPU workers on CPU).
`--compare`: two specs, one disaggregated and one colocated, and the ratio of their goodputs.
Bad input (unknown workload, empty rate list, SLO <= 0, ...) prints `error: <flag>: <why>` and
exits 2 before any cluster starts.

Output: `--out` (default $OUT/goodput.json, else ./goodput.json) and one PNG per workload next
to it (`<stem>-<workload>.png`). The JSON (schema_version 1; times in seconds, rates in req/s):
  config:     {workloads, rates, num_requests, time_limit_s, drain_s, seed, scale,
               slo: {ttft_s, tpot_s, attainment}, command,
               host: {cpu_count, load_average_at_start, load_average_at_end: [1, 5, 15 min]}}
  clusters:   [{name, mode, device, num_devices, model, workers: {pool: n}, spec, tokenizer}]
  results:    [{cluster, mode, workload, workload_source, num_devices, goodput_rps,
                goodput_rps_per_device, rates: [RateRecord]}]  one per cluster x workload
  RateRecord: {rate, num_sent, num_finished, num_failed, duration_s,
               ttft_s: {p50, p90, p99}, tpot_s: {p50, p90, p99}, attainment: {ttft, tpot, both},
               requests: [{arrival_s, prompt_tokens, output_tokens, ttft_s, e2e_s, tpot_s, error}]}
  comparison: [{workload, disaggregated, colocated, ratio}]  per-device goodputs; --compare only
Percentiles are over finished requests; attainment over all sent ones (unfinished ones fail).
A goodput or ratio of null: no swept rate met the goal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.goodput_cluster import (  # noqa: E402
    ClusterInfo,
    external,
    read_spec,
    shutdown_ray,
    spec_info,
    started,
)
from bench.goodput_metrics import (  # noqa: E402
    GoodputInputError,
    RateRecord,
    Slo,
    goodput_rps,
    parse_rates,
    per_device,
)
from bench.goodput_report import comparison, print_report, write_outputs  # noqa: E402
from bench.goodput_sweep import SweepBounds, sweep_workload, warm_up  # noqa: E402
from bench.goodput_workloads import (  # noqa: E402
    Encode,
    ModelLimits,
    Workload,
    build_workload,
    check_workload_name,
)
from tandem.client import AsyncClient  # noqa: E402

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Options:
    specs: tuple[str, ...]
    address: str | None
    devices: int | None
    compare: bool
    workloads: tuple[str, ...]
    rates: tuple[float, ...]
    num_requests: int
    bounds: SweepBounds
    slo: Slo
    scale: int
    tokenizer: str | None
    out: Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", action="append", default=[], help="a cluster spec to start")
    p.add_argument("--address", help="a serving router's gRPC address instead of --spec")
    p.add_argument("--devices", type=int, help="--address: devices it uses (default: workers)")
    p.add_argument("--compare", action="store_true", help="two specs: disaggregated, colocated")
    p.add_argument("--workloads", default="mix-8:1,mix-1:8", help="comma-separated")
    p.add_argument("--rates", default="1,2,4", help="requests/s, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per rate")
    p.add_argument("--time-limit", type=float, default=60.0, help="s of sending per rate")
    p.add_argument("--drain", type=float, default=30.0, help="s after the last send per rate")
    p.add_argument("--ttft-slo-ms", type=float, default=1000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=100.0)
    p.add_argument("--attainment", type=float, default=0.9, help="goal for goodput")
    p.add_argument("--scale", type=int, default=16, help="tokens per unit of a mix-I:O")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="checkpoint dir whose tokenizer counts ShareGPT tokens")
    p.add_argument("--out", help="the JSON path (PNGs go next to it)")
    return p


def options_from(args: argparse.Namespace) -> Options:
    """Validated options; raises GoodputInputError naming the flag. Starts nothing."""
    _check_target(args)
    workloads = tuple(w.strip() for w in args.workloads.split(",") if w.strip())
    if not workloads:
        raise GoodputInputError("--workloads", "the list of workloads is empty")
    for name in workloads:
        check_workload_name(name)
    for flag, value in (("--requests", args.requests), ("--scale", args.scale)):
        if value < 1:
            raise GoodputInputError(flag, f"must be at least 1, got {value}")
    if args.tokenizer is not None and not Path(args.tokenizer).is_dir():
        raise GoodputInputError("--tokenizer", f"{args.tokenizer}: not a checkpoint directory")
    for flag, value in (("--time-limit", args.time_limit), ("--drain", args.drain)):
        if not value > 0:
            raise GoodputInputError(flag, f"must be a positive number of seconds, got {value}")
    return Options(
        specs=tuple(args.spec),
        address=args.address,
        devices=args.devices,
        compare=args.compare,
        workloads=workloads,
        rates=tuple(parse_rates(args.rates)),
        num_requests=args.requests,
        bounds=SweepBounds(args.seed, args.time_limit, args.drain),
        slo=Slo(args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3, args.attainment),
        scale=args.scale,
        tokenizer=args.tokenizer,
        out=Path(args.out or Path(os.environ.get("OUT", "."), "goodput.json")),
    )


def _check_target(args: argparse.Namespace) -> None:
    if bool(args.spec) == bool(args.address):
        raise GoodputInputError("--spec", "give one or more --spec, or --address (not both)")
    if args.devices is not None and args.devices < 1:
        raise GoodputInputError("--devices", f"must be at least 1, got {args.devices}")
    infos = [spec_info(path, read_spec(path)) for path in args.spec]
    modes = [info.mode for info in infos]
    if args.compare and sorted(modes) != ["colocated", "disaggregated"]:
        raise GoodputInputError(
            "--compare", f"needs one disaggregated and one colocated --spec, got {modes or 'none'}"
        )
    devices = {(info.device, info.num_devices) for info in infos}
    if args.compare and len(devices) > 1:
        print(f"warning: --compare: not the same hardware {sorted(devices)}", file=sys.stderr)


def encoder(explicit: str | None, model_path: str | None) -> tuple[Encode, str]:
    """The tokenizer of `--tokenizer` (`explicit`), else of the model's checkpoint, else UTF-8
    bytes as token ids (a shape-only model has none); and its name for the JSON."""
    from router.tokenizer import ByteTokenizer, HfTokenizer

    if explicit:
        try:
            return HfTokenizer(explicit).encode, f"hf:{explicit}"
        except Exception as exc:  # noqa: BLE001 (any loading failure is the flag's fault)
            raise GoodputInputError("--tokenizer", f"{explicit}: cannot load ({exc})") from None
    if model_path:
        try:
            return HfTokenizer(model_path).encode, f"hf:{model_path}"
        except Exception:  # noqa: BLE001 (no tokenizer files there: count bytes instead)
            pass
    return ByteTokenizer().encode, "bytes"


def local_checkpoint(model: str) -> str | None:
    """A serving cluster's model name as a checkpoint dir here (a dir, or a built-in name)."""
    if Path(model).is_dir():
        return model
    if model in ("tiny-random", "demo"):
        from engine.demo_model import resolve_model_path

        try:
            return resolve_model_path(model)
        except Exception:  # noqa: BLE001 (not installed here: no tokenizer)
            return None
    return None


class Progress:
    """A rich progress bar with one task per cluster x workload, advanced once per rate."""

    def __init__(self) -> None:
        from rich.progress import Progress as RichProgress

        self.bar = RichProgress(transient=False)

    def track(self, label: str, total: int) -> Callable[[], None]:
        task = self.bar.add_task(label, total=total)
        return lambda: self.bar.advance(task)


async def sweep_cluster(
    address: str, info: ClusterInfo, model_path: str | None, o: Options, progress: Progress
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every workload x rate against the cluster at `address`: (its JSON, its results)."""
    client = AsyncClient(address)
    try:
        model = await client.model_info()
        limits = ModelLimits(model.vocab_size, model.max_model_len)
        encode, tokenizer = encoder(o.tokenizer, model_path or local_checkpoint(model.model))
        await warm_up(client, limits.vocab_size)
        results = []
        for name in o.workloads:
            workload = build_workload(name, o.num_requests, o.bounds.seed, o.scale, limits, encode)
            advance = progress.track(f"{info.name} {name}", len(o.rates))
            records = await sweep_workload(
                client, workload, list(o.rates), o.slo, o.bounds, advance
            )
            results.append(result_json(info, workload, records, o.slo))
    finally:
        await client.close()
    return asdict(info) | {"tokenizer": tokenizer}, results


def result_json(
    info: ClusterInfo, workload: Workload, records: list[RateRecord], slo: Slo
) -> dict[str, Any]:
    goodput = goodput_rps(records, slo.attainment)
    return {
        "cluster": info.name,
        "mode": info.mode,
        "workload": workload.name,
        "workload_source": workload.source,
        "num_devices": info.num_devices,
        "goodput_rps": goodput,
        "goodput_rps_per_device": per_device(goodput, info.num_devices),
        "rates": [r.to_json() for r in records],
    }


async def run(o: Options, progress: Progress) -> dict[str, Any]:
    config = config_json(o)
    clusters, results = [], []
    try:
        if o.address:
            info = await external(o.address, o.devices)
            cluster, found = await sweep_cluster(o.address, info, None, o, progress)
            clusters.append(cluster)
            results += found
        for spec in o.specs:
            async with started(spec) as (address, info, model_path):
                cluster, found = await sweep_cluster(address, info, model_path, o, progress)
            clusters.append(cluster)
            results += found
    finally:
        shutdown_ray()
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config
        | {"host": config["host"] | {"load_average_at_end": list(os.getloadavg())}},
        "clusters": clusters,
        "results": results,
        "comparison": comparison(results) if o.compare else [],
    }


def config_json(o: Options) -> dict[str, Any]:
    return {
        "workloads": list(o.workloads),
        "rates": list(o.rates),
        "num_requests": o.num_requests,
        "time_limit_s": o.bounds.time_limit_s,
        "drain_s": o.bounds.drain_s,
        "seed": o.bounds.seed,
        "scale": o.scale,
        "slo": {"ttft_s": o.slo.ttft_s, "tpot_s": o.slo.tpot_s, "attainment": o.slo.attainment},
        "command": sys.argv,
        "host": {"cpu_count": os.cpu_count(), "load_average_at_start": list(os.getloadavg())},
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        options = options_from(args)
        progress = Progress()
        with progress.bar:
            report = asyncio.run(run(options, progress))
    except GoodputInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_outputs(report, options.out)
    print_report(report)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
