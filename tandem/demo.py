"""`make demo`: a local disaggregated Tandem cluster, three streamed requests, per-stage latency.

    python -m tandem.demo            # Ray + a prefill and a decode worker + the gRPC router
    python -m tandem.demo --offline  # the engine alone, in this process (no Ray, no router)

The cluster path starts a loopback-bound local Ray instance, one prefill and one decode worker
(the built-in demo model on the CPU, or one GPU each when two are visible), and the router on a
free port of 127.0.0.1; sends three requests through `tandem.AsyncClient`, printing each text as
it streams; prints the stages every request went through; and shuts everything down, leaving no
process behind. The demo model has random weights: its text is meaningless by design.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from rich.console import Console
from rich.table import Table

PROMPTS = ["The prefill pool reads", "Hello, world! Tell me a story about", "def main():"]
MAX_TOKENS = 32


async def _stream_all(address: str, console: Console) -> list[tuple[str, Any, int]]:
    from tandem.client import AsyncClient

    rows = []
    async with AsyncClient(address) as client:
        for i, prompt in enumerate(PROMPTS):
            console.print(f"\n[cyan]>>> {prompt}[/cyan]", end="")
            final = None
            async for final in client.generate(prompt, temperature=0.8, top_p=0.95, seed=i,
                                               max_tokens=MAX_TOKENS, ignore_eos=True):
                console.print(final.text_delta, end="", markup=False, highlight=False)
            assert final is not None and final.HasField("timings"), "the stream ended without timings"
            rows.append((str(i), final.timings, final.completion_tokens))
    console.print()
    return rows


async def _run_cluster(console: Console, use_gpus: bool) -> list[tuple[str, Any, int]]:
    from tandem.cluster import ClusterConfig, LocalCluster

    device = "cuda" if use_gpus else "cpu"
    cluster = LocalCluster(ClusterConfig(model="demo", num_prefill=1, num_decode=1, use_gpus=use_gpus,
                                         port=0, engine_kwargs={"device": device}))
    started = time.perf_counter()
    try:
        address = await cluster.start()
        console.print(f"cluster up in {time.perf_counter() - started:.1f} s: router at {address}, "
                      f"workers {', '.join(f'{w} ({p}, {device})' for w, p in cluster.pools.items())}")
        return await _stream_all(address, console)
    finally:
        await cluster.stop()


def cluster_demo(console: Console) -> None:
    import ray

    from engine.demo_model import RANDOM_WEIGHTS_NOTICE
    from tandem.local_ray import start_local_ray
    from tandem.serve import gpu_count
    from tandem.timings_view import timings_table

    console.print("[bold]Tandem demo[/bold]: a local disaggregated cluster (prefill pool -> KV over "
                  "gRPC -> decode pool), the built-in demo model")
    console.print(RANDOM_WEIGHTS_NOTICE)
    started_ray = start_local_ray()
    try:
        rows = asyncio.run(_run_cluster(console, use_gpus=gpu_count("auto") >= 2))
    finally:
        if started_ray:
            ray.shutdown()
    console.print(timings_table(rows))
    console.print(RANDOM_WEIGHTS_NOTICE)


def offline_demo(console: Console) -> None:
    from engine import LLM, SamplingParams
    from engine.demo_model import RANDOM_WEIGHTS_NOTICE

    console.print("[bold]Tandem demo[/bold] (offline engine, built-in demo model)")
    console.print(RANDOM_WEIGHTS_NOTICE)
    llm = LLM("demo", show_progress=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=MAX_TOKENS)
    table = Table(title="per-stage latency (ms)")
    for col in ("request", "queue+prefill (TTFT)", "decode", "tokens", "TPOT"):
        table.add_column(col, justify="right")
    for i, prompt in enumerate(PROMPTS):
        start = time.perf_counter()
        engine.add_request(str(i), prompt, params)
        console.print(f"\n[cyan]>>> {prompt}[/cyan]", end="")
        first = None
        while engine.has_unfinished():
            for out in engine.step():
                first = first or time.perf_counter()
                console.print(out.text_delta, end="", markup=False, highlight=False)
        end = time.perf_counter()
        assert first is not None, "the engine produced no output"
        n = len(out.token_ids)
        ttft, decode = (first - start) * 1e3, (end - first) * 1e3
        table.add_row(str(i), f"{ttft:.1f}", f"{decode:.1f}", str(n), f"{decode / max(n - 1, 1):.2f}")
    console.print()
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tandem.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="the engine alone, in this process")
    args = parser.parse_args(argv)
    console = Console()
    if args.offline:
        offline_demo(console)
    else:
        cluster_demo(console)


if __name__ == "__main__":
    main()
