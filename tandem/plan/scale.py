"""How fast the simulator runs at scale: `python -m tandem.plan.scale --gpus 1024 --seconds 10`.

One whole-path simulation of a disaggregated cluster (P:D from `--ratio`, TP 1) at `--rate`
requests/s per GPU, ShareGPT lengths, the H100 profile; prints simulated requests per second of
wall time and, with `--profile-out`, writes cProfile stats (where the time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from dataclasses import replace

from tandem.plan.cluster import ClusterConfig, SloTargets
from tandem.plan.profile import load_profile
from tandem.plan.simulator import SimSettings, simulate
from tandem.plan.workload import resolve, trace


def measure(
    gpus: int,
    seconds: float,
    rate_per_gpu: float,
    prefill_share: float,
    prefix_caching: bool,
    router_s: float | None = None,
) -> dict[str, float]:
    """One run; its size and speed."""
    profile = load_profile("h100-llama3-8b")
    if router_s is not None:
        profile = replace(profile, router_s_per_request=router_s)
    workload = resolve("sharegpt", profile.max_model_len)
    num_prefill = max(1, round(gpus * prefill_share))
    config = ClusterConfig(num_prefill=num_prefill, num_decode=max(1, gpus - num_prefill))
    arrivals = trace(workload, rate_per_gpu * gpus, seconds, seed=0)
    slo = SloTargets(0.4, 0.04)
    started, cpu_started = time.perf_counter(), time.process_time()
    result = simulate(
        profile,
        config,
        slo,
        arrivals,
        rate_per_gpu * gpus,
        SimSettings(enable_prefix_caching=prefix_caching),
    )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    tokens = sum(r.output_len for r in result.records if r.finish is not None)
    return {
        "gpus": config.num_gpus,
        "requests": len(arrivals),
        "engine_steps": result.num_steps,
        "output_tokens": tokens,
        "attainment": result.attainment(slo),
        "wall_s": wall,
        "requests_per_wall_s": len(arrivals) / wall,
        "tokens_per_wall_s": tokens / wall,
        "cpu_s": cpu,
        "requests_per_cpu_s": len(arrivals) / cpu,
        "tokens_per_cpu_s": tokens / cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpus", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s per GPU")
    parser.add_argument("--prefill-share", type=float, default=0.25)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--router-s-per-request", type=float, default=None)
    parser.add_argument("--profile-out", default=None)
    args = parser.parse_args()

    def run() -> dict[str, float]:
        caching = not args.no_prefix_caching
        return measure(
            args.gpus,
            args.seconds,
            args.rate,
            args.prefill_share,
            caching,
            args.router_s_per_request,
        )

    if args.profile_out:
        prof = cProfile.Profile()
        out = prof.runcall(run)
        prof.dump_stats(args.profile_out)
        pstats.Stats(args.profile_out).sort_stats("tottime").print_stats(15)
    else:
        out = run()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
