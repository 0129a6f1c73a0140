"""Time to first token of a 4k-token prompt whose prefix sits in the CPU tier, against
recomputing it (Llama-3-8B shape, dummy bf16, one GPU).

    python bench/tier_prefix.py                       # GPU
    python bench/tier_prefix.py --model preset:tiny --device cpu --prompt 256 --blocks 44 --cpu-blocks 30

A small HBM pool (so the prompt's blocks get evicted), a pinned CPU tier under it. Measures:
cold TTFT (full prefill), then after other prompts pushed the prefix out of HBM into the CPU
tier, the TTFT of the same prompt served from the tier (load + the last block's prefill),
median of 3 (after one warm-up round). Each tier run is timed without a sync (`Timeline`:
host times and CUDA events around the onload's fetch and write, the spill of the blocks the
admission evicts, and each forward pass), so a host-bound stage shows apart from a
device-bound one. An experiment last: the same tier runs with the blocks the admission evicts
dropped instead of spilled (what their device -> host copies cost the TTFT). Writes $OUT/tier_prefix.json when OUT is set.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_name, print_table, write_json  # noqa: E402
from bench.engine import random_prompts  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from kvtransfer.cache_view import KVCacheView  # noqa: E402
from kvtransfer.tiers.engine_cache import TieredEngineCache  # noqa: E402
from kvtransfer.tiers.store import TieredStore  # noqa: E402

ONE = SamplingParams(temperature=0.0, max_tokens=1)


def _event() -> Any:
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class Timeline:
    """Where one TTFT run goes, without a sync: for the tier's onload (fetch: pinned -> device;
    write: the scatter into the new blocks), the spill of the blocks the admission evicts
    (gather + enqueue; its device -> host copy runs on a pump thread) and each forward pass,
    the host time of the call and CUDA events on the engine's stream around it, relative to
    the start of `ttft()`. Tells a host-bound stage from a device-bound one."""

    def __init__(self) -> None:
        self.start: tuple[float, Any] = (0.0, None)
        self.marks: list[tuple[str, float, float, Any, Any]] = []

    def begin(self) -> None:
        self.start, self.marks = (time.perf_counter(), _event()), []

    def timed(self, name: str, call: Callable[[], Any]) -> Any:
        called, before = time.perf_counter(), _event()
        out = call()
        self.marks.append((name, called, time.perf_counter(), before, _event()))
        return out

    def rows(self) -> dict[str, float]:
        """ms from the start, per stage (the last of each name), once the run has ended."""
        t0, e0 = self.start
        row: dict[str, float] = {}
        for name, called, returned, before, after in self.marks:
            row[f"{name}: host called at"] = (called - t0) * 1e3
            row[f"{name}: host returned at"] = (returned - t0) * 1e3
            if e0 is not None:
                after.synchronize()
                row[f"{name}: device started at"] = e0.elapsed_time(before)
                row[f"{name}: device took"] = before.elapsed_time(after)
        return row


class TimedCache(TieredEngineCache):
    """The engine's tier cache, its calls on the timeline."""

    def __init__(self, store: TieredStore, view: KVCacheView, timeline: Timeline) -> None:
        super().__init__(store, view)
        self.timeline = timeline
        self.drop_spills = False  # the experiment: evicted blocks are dropped, no spill traffic

    def fetch(self, block_hashes: Sequence[bytes]) -> tuple[int, object]:
        return self.timeline.timed(
            "onload fetch", lambda: super(TimedCache, self).fetch(block_hashes)
        )

    def write(self, staged: object, block_ids: Sequence[int]) -> None:
        self.timeline.timed(
            "onload write", lambda: super(TimedCache, self).write(staged, block_ids)
        )

    def flush_spills(self) -> None:
        if self.drop_spills:
            self._pending.clear()
            return
        self.timeline.timed("spill", super().flush_spills)


class ForwardProbe:
    """Wraps the runner's `forward`: each call on the timeline (the last is the tail step's)."""

    def __init__(self, llm: LLM, timeline: Timeline) -> None:
        self.timeline = timeline
        self.inner = llm.engine.runner.forward
        llm.engine.runner.forward = self  # type: ignore[method-assign]

    def __call__(self, host: Any, layer_marks: Any = None) -> torch.Tensor:
        return self.timeline.timed("forward", lambda: self.inner(host, layer_marks))


TIMELINE = Timeline()


def ttft(llm: LLM, prompt: list[int], rid: str) -> float:
    engine = llm.engine
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    TIMELINE.begin()
    start = time.perf_counter()
    engine.add_request(rid, prompt, ONE)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def push_out(llm: LLM, store: TieredStore, args: argparse.Namespace, seed: int, tag: str) -> None:
    """Other prompts take the HBM pool: the target's blocks spill into the CPU tier."""
    vocab = llm.engine.vocab_size
    for j, filler in enumerate(
        random_prompts(3, args.prompt - args.prompt // 40, vocab, 100 + seed)
    ):
        ttft(llm, filler, f"fill{tag}-{j}")
    store.flush()


def tier_run(llm: LLM, store: TieredStore, prompt: list[int], rid: str) -> float:
    before = llm.engine.kv_manager.external_hit_tokens
    took = ttft(llm, prompt, rid)
    hit = llm.engine.kv_manager.external_hit_tokens - before
    assert hit >= len(prompt) - 2 * llm.engine.config.block_size, (
        f"only {hit} tokens came from the tier"
    )
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=700, help="HBM KV blocks")
    parser.add_argument("--cpu-blocks", type=int, default=400)
    args = parser.parse_args()
    kwargs: dict[str, Any] = (
        dict(dtype="bfloat16", enforce_eager=False) if args.device == "cuda" else {}
    )
    llm = LLM(
        args.model,
        device=args.device,
        load_format="dummy",
        show_progress=False,
        num_kv_blocks=args.blocks,
        max_model_len=2 * args.prompt,
        **kwargs,
    )
    view = KVCacheView(llm.engine.runner.kv_cache)
    store = TieredStore(
        view,
        model_salt=llm.engine.kv_manager.salt,
        cpu_bytes=args.cpu_blocks * view.bytes_per_block(),
    )
    cache = TimedCache(store, view, TIMELINE)
    llm.engine.attach_external_cache(cache)
    ForwardProbe(llm, TIMELINE)
    vocab = llm.engine.vocab_size
    ttft(llm, random_prompts(1, min(512, args.prompt), vocab, 99)[0], "warm")
    cold, tiered, timelines, still_copying = [], [], [], []
    for i in range(4):  # round 0 warms the tier path up
        prompt = random_prompts(1, args.prompt, vocab, i)[0]
        cold.append(ttft(llm, prompt, f"cold{i}"))
        push_out(llm, store, args, i, str(i))
        took = tier_run(llm, store, prompt, f"tier{i}")
        timelines.append({**TIMELINE.rows(), "first token at": took * 1e3})
        flush_start = time.perf_counter()
        store.flush()
        still_copying.append((time.perf_counter() - flush_start) * 1e3)
        tiered.append(took)
    cold, tiered, timelines, still_copying = cold[1:], tiered[1:], timelines[1:], still_copying[1:]
    dropped = []  # the same, but the blocks the tier run's admission evicts are dropped, not spilled
    for i in range(4, 7):
        prompt = random_prompts(1, args.prompt, vocab, i)[0]
        ttft(llm, prompt, f"cold{i}")
        push_out(llm, store, args, i, str(i))
        cache.drop_spills = True
        dropped.append(tier_run(llm, store, prompt, f"tier{i}"))
        cache.drop_spills = False
    c, t = statistics.median(cold), statistics.median(tiered)
    print(f"device: {gpu_name() if args.device == 'cuda' else 'cpu'}, model {args.model}")
    d = statistics.median(dropped)
    print_table(
        f"{args.prompt}-token prompt: TTFT (ms, median of 3)",
        [
            "recompute",
            "prefix in CPU tier",
            "ratio",
            "target",
            "same, evictions not spilled (experiment)",
        ],
        [
            [
                f"{c * 1e3:.1f}",
                f"{t * 1e3:.1f}",
                f"{t / c:.3f}x",
                "<= 0.2x",
                f"{d * 1e3:.1f} ({d / c:.3f}x)",
            ]
        ],
    )
    timeline = {k: statistics.median(t[k] for t in timelines) for k in timelines[0]}
    timeline["spill copy still running after the first token"] = statistics.median(still_copying)
    print_table(
        "where the tier TTFT goes (ms from the start of the request, medians; CUDA events, no syncs)",
        ["moment", "ms"],
        [[k, f"{v:.2f}"] for k, v in timeline.items()],
    )
    write_json(
        "tier_prefix",
        {
            "device": gpu_name() if args.device == "cuda" else "cpu",
            "recompute_s": cold,
            "cpu_tier_s": tiered,
            "ratio": t / c,
            "evictions_dropped_s": dropped,
            "timeline_ms": timeline,
            "timelines": timelines,
        },
    )
    store.close()


if __name__ == "__main__":
    main()
