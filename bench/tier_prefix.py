"""Time to first token of a 4k-token prompt whose prefix sits in the CPU tier, against
recomputing it (Llama-3-8B shape, dummy bf16, one GPU).

    python bench/tier_prefix.py                       # GPU
    python bench/tier_prefix.py --model preset:tiny --device cpu --prompt 256 --blocks 44 --cpu-blocks 30

A small HBM pool (so the prompt's blocks get evicted), a pinned CPU tier under it. Measures:
cold TTFT (full prefill), then after other prompts pushed the prefix out of HBM into the CPU
tier, the TTFT of the same prompt served from the tier (load + the last block's prefill),
median of 3. One more instrumented run splits the tier TTFT into its stages, each timed with
the engine's stream synchronised around it: onload (fetch: pinned -> device; write: scatter
into the new blocks), the spill of the blocks the admission evicts that stays on the critical
path (gather + enqueue; its device -> host copy runs on a side stream), and the rest (the
uncached tail's prefill and the step). The uninstrumented runs also time the tail step's forward
pass with CUDA events (no syncs): when the host called and had enqueued it, when the device
started and how long it ran, so a host-bound step shows apart from a device-bound one. An experiment last: the same tier
runs with the blocks the admission evicts dropped instead of spilled (what their device ->
host copies cost the TTFT). Writes $OUT/tier_prefix.json when OUT is set.
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


def stream_sync() -> None:
    """Waits for the engine's stream only (a spill's side-stream copy keeps running)."""
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


class TimedCache(TieredEngineCache):
    """The engine's tier cache; while `timing`, each call is timed between stream syncs."""

    def __init__(self, store: TieredStore, view: KVCacheView) -> None:
        super().__init__(store, view)
        self.timing = False
        self.drop_spills = False  # the experiment: evicted blocks are dropped, no spill traffic
        self.ms: dict[str, float] = {"onload: fetch": 0.0, "onload: write": 0.0, "spill on the critical path": 0.0}

    def _timed(self, name: str, call: Callable[[], Any]) -> Any:
        if not self.timing:
            return call()
        stream_sync()
        start = time.perf_counter()
        out = call()
        stream_sync()
        self.ms[name] += (time.perf_counter() - start) * 1e3
        return out

    def fetch(self, block_hashes: Sequence[bytes]) -> tuple[int, object]:
        return self._timed("onload: fetch", lambda: super(TimedCache, self).fetch(block_hashes))

    def write(self, staged: object, block_ids: Sequence[int]) -> None:
        self._timed("onload: write", lambda: super(TimedCache, self).write(staged, block_ids))

    def flush_spills(self) -> None:
        if self.drop_spills:
            self._pending.clear()
            return
        self._timed("spill on the critical path", super().flush_spills)


def _event() -> Any:
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class ForwardProbe:
    """Wraps the runner's `forward`: when each forward pass was called and enqueued on the host,
    and (CUDA events, no host wait) when the device reached and finished it, relative to the
    start of `ttft()`. Tells a host-bound step from a device-bound one without syncing."""

    def __init__(self, llm: LLM) -> None:
        self.runner = llm.engine.runner
        self.inner = self.runner.forward
        self.runner.forward = self  # type: ignore[method-assign]
        self.start: tuple[float, Any] = (0.0, None)
        self.calls: list[tuple[float, float, Any, Any]] = []

    def begin(self) -> None:
        self.start, self.calls = (time.perf_counter(), _event()), []

    def __call__(self, host: Any, layer_marks: Any = None) -> torch.Tensor:
        called, before = time.perf_counter(), _event()
        out = self.inner(host, layer_marks)
        self.calls.append((called, time.perf_counter(), before, _event()))
        return out

    def last(self) -> dict[str, float]:
        """Times (ms) of the last forward pass of the run, once the run has ended."""
        called, enqueued, before, after = self.calls[-1]
        t0, e0 = self.start
        row = {"host: forward called at": (called - t0) * 1e3, "host: forward enqueued at": (enqueued - t0) * 1e3}
        if e0 is not None:
            after.synchronize()
            row["device: forward started at"] = e0.elapsed_time(before)
            row["device: forward took"] = before.elapsed_time(after)
        return row


PROBE: ForwardProbe | None = None


def ttft(llm: LLM, prompt: list[int], rid: str) -> float:
    engine = llm.engine
    stream_sync()
    if PROBE is not None:
        PROBE.begin()
    start = time.perf_counter()
    engine.add_request(rid, prompt, ONE)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def push_out(llm: LLM, store: TieredStore, args: argparse.Namespace, seed: int, tag: str) -> None:
    """Other prompts take the HBM pool: the target's blocks spill into the CPU tier."""
    vocab = llm.engine.vocab_size
    for j, filler in enumerate(random_prompts(3, args.prompt - args.prompt // 40, vocab, 100 + seed)):
        ttft(llm, filler, f"fill{tag}-{j}")
    store.flush()


def tier_run(llm: LLM, store: TieredStore, prompt: list[int], rid: str) -> float:
    before = llm.engine.kv_manager.external_hit_tokens
    took = ttft(llm, prompt, rid)
    hit = llm.engine.kv_manager.external_hit_tokens - before
    assert hit >= len(prompt) - 2 * llm.engine.config.block_size, f"only {hit} tokens came from the tier"
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preset:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--blocks", type=int, default=700, help="HBM KV blocks")
    parser.add_argument("--cpu-blocks", type=int, default=400)
    args = parser.parse_args()
    kwargs: dict[str, Any] = dict(dtype="bfloat16", enforce_eager=False) if args.device == "cuda" else {}
    llm = LLM(args.model, device=args.device, load_format="dummy", show_progress=False, num_kv_blocks=args.blocks,
              max_model_len=2 * args.prompt, **kwargs)
    view = KVCacheView(llm.engine.runner.kv_cache)
    store = TieredStore(view, model_salt=llm.engine.kv_manager.salt, cpu_bytes=args.cpu_blocks * view.bytes_per_block())
    cache = TimedCache(store, view)
    llm.engine.attach_external_cache(cache)
    vocab = llm.engine.vocab_size
    ttft(llm, random_prompts(1, min(512, args.prompt), vocab, 99)[0], "warm")
    global PROBE
    PROBE = ForwardProbe(llm)
    cold, tiered, anatomy = [], [], []
    for i in range(4):  # the last round is the instrumented one
        prompt = random_prompts(1, args.prompt, vocab, i)[0]
        cold.append(ttft(llm, prompt, f"cold{i}"))
        push_out(llm, store, args, i, str(i))
        cache.timing = i == 3
        took = tier_run(llm, store, prompt, f"tier{i}")
        if i < 3:
            anatomy.append({**PROBE.last(), "first token at": took * 1e3})
        flush_start = time.perf_counter()
        store.flush()
        still_copying_ms = (time.perf_counter() - flush_start) * 1e3
        (tiered if i < 3 else [took]).append(took)
        if i == 3:
            instrumented_ms, last_flush_ms = took * 1e3, still_copying_ms
    dropped = []  # the same, but the blocks the tier run's admission evicts are dropped, not spilled
    for i in range(4, 7):
        prompt = random_prompts(1, args.prompt, vocab, i)[0]
        ttft(llm, prompt, f"cold{i}")
        push_out(llm, store, args, i, str(i))
        cache.drop_spills = True
        dropped.append(tier_run(llm, store, prompt, f"tier{i}"))
        cache.drop_spills = False
    c, t = statistics.median(cold[:3]), statistics.median(tiered)
    print(f"device: {gpu_name() if args.device == 'cuda' else 'cpu'}, model {args.model}")
    d = statistics.median(dropped)
    print_table(f"{args.prompt}-token prompt: TTFT (ms, median of 3)",
                ["recompute", "prefix in CPU tier", "ratio", "target", "same, evictions not spilled (experiment)"],
                [[f"{c * 1e3:.1f}", f"{t * 1e3:.1f}", f"{t / c:.3f}x", "<= 0.2x", f"{d * 1e3:.1f} ({d / c:.3f}x)"]])
    stages = dict(cache.ms)
    stages["the rest: uncached tail prefill + step"] = instrumented_ms - sum(stages.values())
    rows = [[name, f"{ms:.2f}"] for name, ms in stages.items()]
    rows += [["TTFT, instrumented run", f"{instrumented_ms:.2f}"], ["recompute TTFT (median)", f"{c * 1e3:.2f}"],
             ["spill copy still running after the first token", f"{last_flush_ms:.2f}"]]
    print_table("where the tier TTFT goes (one instrumented run, engine stream synced per stage)", ["stage", "ms"], rows)
    timeline = {k: statistics.median(a[k] for a in anatomy) for k in anatomy[0]}
    print_table("the tail step's forward pass in the tier runs (ms from the start, medians; events, no syncs)",
                ["moment", "ms"], [[k, f"{v:.2f}"] for k, v in timeline.items()])
    write_json("tier_prefix", {"device": gpu_name() if args.device == "cuda" else "cpu", "recompute_s": cold[:3],
                               "cpu_tier_s": tiered, "ratio": t / c,
                               "evictions_dropped_s": dropped, "stages_ms": stages,
                               "instrumented_ttft_ms": instrumented_ms, "spill_after_first_token_ms": last_flush_ms,
                               "tail_forward_ms": timeline, "tail_forward_runs": anatomy})
    store.close()


if __name__ == "__main__":
    main()
