"""`make demo`: generate from the built-in demo model and print streamed text and timings.

Until a cluster is running this drives the engine's step API in-process (offline mode).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

PROMPTS = ["The prefill pool reads", "Hello, world! Tell me a story about", "def main():"]


def offline_demo(console: Console) -> None:
    from engine import LLM, SamplingParams
    from engine.demo_model import RANDOM_WEIGHTS_NOTICE

    console.print("[bold]Tandem demo[/bold] (offline engine, built-in demo model)")
    console.print(RANDOM_WEIGHTS_NOTICE)
    llm = LLM("demo", show_progress=False)
    engine = llm.engine
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=32)
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
        n = len(out.token_ids)
        ttft, decode = (first - start) * 1e3, (end - first) * 1e3
        table.add_row(str(i), f"{ttft:.1f}", f"{decode:.1f}", str(n), f"{decode / max(n - 1, 1):.2f}")
    console.print()
    console.print(table)


def main() -> None:
    offline_demo(Console())


if __name__ == "__main__":
    main()
