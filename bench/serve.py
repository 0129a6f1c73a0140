"""Serving benchmark: a real cluster on GPUs under a Poisson workload, disaggregated vs colocated.

    python bench/serve.py [--requests 64] [--rate 4] [--prompt 1024] [--output 128]

Llama-3-8B shape with dummy bf16 weights. Disaggregated: one prefill GPU and one decode GPU,
KV over torch.distributed p2p (NCCL), streamed while the prompt is prefilled (the default);
`disaggregated-nostream`: the same, with the decode worker started only once the first token
is out (RouterConfig.stream_kv off), the peer of the streamed path; colocated: one engine per
GPU on the same GPUs, the baseline. Prints TTFT and TPOT p50 / p99 and each stage's share of TTFT (from the stage
timings every final response carries).

`--address HOST:PORT` runs the same workload against a cluster that is already serving (for
instance `tandem serve --model demo` on a CPU), mode `external`: the peer of a third-party load
generator pointed at the same cluster's HTTP port (`bench/aiperf_vs_serve.sh`).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_json  # noqa: E402
from tandem.client import AsyncClient  # noqa: E402
from tandem.cluster import ClusterConfig, LocalCluster  # noqa: E402

STAGES = ("router_queue", "prefill_queue", "prefill", "kv_transfer", "decode_queue", "decode")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Open-loop Poisson arrivals: `num_requests` offsets (s, increasing) with exponential gaps
    of mean 1/rate, drawn from `rng` (the same seed gives the same schedule)."""
    arrivals, t = [], 0.0
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals


async def one(client: AsyncClient, prompt: list[int], out_len: int, delay: float) -> dict:
    await asyncio.sleep(delay)
    start = time.perf_counter()
    first, second, n, final = None, None, 0, None
    async for msg in client.generate(
        prompt, temperature=0.0, max_tokens=out_len, ignore_eos=True, best_effort=True
    ):  # measure latency, do not shed load
        first = first or time.perf_counter()
        n += len(msg.token_ids)
        if n >= 2 and second is None:
            second = time.perf_counter()
        final = msg
    end = time.perf_counter()
    t = final.timings
    return {
        "ttft": first - start,
        "tpot": (end - first) / max(n - 1, 1),
        "tokens": n,
        "second_gap": (second or end) - first,
        "stages": {s: getattr(t, s) for s in STAGES},
        "server_ttft": t.time_to_first_token,
        "start": start,
        "end": end,
    }


async def workload(address: str, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(0)
    client = AsyncClient(address)
    try:
        await one(client, [1] * 16, 4, 0)  # warm the path
        delays = poisson_arrivals(args.requests, args.rate, rng)
        top = min(120000, (await client.model_info()).vocab_size)
        prompts = [[rng.randrange(1000, top) for _ in range(args.prompt)] for _ in delays]
        return await asyncio.gather(
            *(one(client, p, args.output, d) for p, d in zip(prompts, delays))
        )
    finally:
        await client.close()


async def run_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    engine_kwargs = {
        "load_format": "dummy",
        "dtype": "bfloat16",
        "gpu_memory_utilization": 0.85,
        "max_model_len": max(4096, args.prompt + args.output),
    }
    disaggregated = mode.startswith("disaggregated")
    config = ClusterConfig(
        model="preset:llama-3-8b",
        mode="disaggregated" if disaggregated else mode,
        num_colocated=2,
        use_gpus=True,
        engine_kwargs=engine_kwargs,
        kv_transport="p2p" if disaggregated else "grpc",
        stream_kv=mode != "disaggregated-nostream",
    )
    cluster = LocalCluster(config)
    address = await cluster.start()
    try:
        return await workload(address, args)
    finally:
        await cluster.stop()


def summarize(mode: str, results: list[dict]) -> tuple[list[object], dict]:
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results]
    server_ttft = statistics.mean(r["server_ttft"] for r in results) or 1e-9
    shares = {
        s: statistics.mean(r["stages"][s] or 0.0 for r in results) / server_ttft for s in STAGES[:4]
    }
    gap = [r["second_gap"] for r in results]
    kv_ms = statistics.median(r["stages"]["kv_transfer"] or 0.0 for r in results) * 1e3
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    out_tps = sum(r["tokens"] for r in results) / wall
    row = [
        mode,
        f"{pct(ttft, 0.5) * 1e3:.0f}",
        f"{pct(ttft, 0.99) * 1e3:.0f}",
        f"{pct(tpot, 0.5) * 1e3:.1f}",
        f"{pct(tpot, 0.99) * 1e3:.1f}",
        f"{pct(gap, 0.5) * 1e3:.1f}",
        f"{kv_ms:.2f}",
        f"{out_tps:.1f}",
    ] + [f"{shares[s]:.0%}" for s in STAGES[:4]]
    return row, {
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": pct(tpot, 0.5),
        "tpot_p99": pct(tpot, 0.99),
        "second_token_gap_p50": pct(gap, 0.5),
        "kv_transfer_stage_ms_p50": kv_ms,
        "output_tokens_per_s": out_tps,
        "ttft_shares": shares,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument(
        "--modes", nargs="+", default=["disaggregated", "disaggregated-nostream", "colocated"]
    )
    parser.add_argument("--address", help="an already-serving cluster's gRPC address")
    args = parser.parse_args()
    rows, report = [], {"args": vars(args)}
    for mode in ["external"] if args.address else args.modes:
        if args.address:
            results = asyncio.run(workload(args.address, args))
        else:
            results = asyncio.run(run_mode(mode, args))
        row, report[mode] = summarize(mode, results)
        rows.append(row)
    print_table(
        f"{args.requests} requests, Poisson {args.rate}/s, {args.prompt} in / {args.output} out (ms)",
        [
            "mode",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "TPOT p99",
            "1st->2nd token p50",
            "kv_transfer stage p50",
            "out tok/s",
            "router q",
            "prefill q",
            "prefill",
            "KV transfer",
        ],
        rows,
    )
    write_json("serve", report)


if __name__ == "__main__":
    main()
