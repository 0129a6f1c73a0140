"""Decode step time of one engine tree, for before/after comparisons of a refactor.

    python bench/decode_ab.py --root PATH [--batches 1,64] [--steps 40] [--label NAME]

Imports `engine` from PATH (a checkout of any commit: its `LLM` and `LLMEngine.step` API is all
this uses), builds Llama-3-8B shape with dummy bf16 weights (`load_format="dummy"`), and times
decode steps at context ~1k for each batch size the way bench/engine.py does: every request
prefilled and decoding, a host clock around each `engine.step()` after a device sync, the
median of the steps after the first two. Prints one JSON line; run it once per tree, in
separate processes, in the same device call, alternating trees, to compare them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

CTX = 1024


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, CTX), generator=gen).tolist()


def step_times(llm: object, batch: int, steps: int) -> list[float]:
    import torch

    from engine import SamplingParams

    engine = llm.engine  # type: ignore[attr-defined]
    # ceil division written out: the trees this times may predate engine.utils.math.cdiv
    warmup = -(-batch * CTX // engine.config.max_num_batched_tokens) + 8
    params = SamplingParams(temperature=0.0, max_tokens=steps + warmup, ignore_eos=True)
    ids = [f"ab{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, _prompts(batch, engine.vocab_size, batch)):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step())
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    engine.abort(ids)
    while engine.has_unfinished():
        engine.step()
    return times[2:]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True, help="the tree whose `engine` package to time")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--label", default=None)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    sys.path.insert(0, str(root))
    import torch

    from engine import LLM

    assert Path(sys.modules["engine"].__file__).resolve().is_relative_to(root)  # type: ignore[arg-type]
    batches = [int(b) for b in args.batches.split(",")]
    built = time.perf_counter()
    llm = LLM(
        "preset:llama-3-8b",
        load_format="dummy",
        dtype="bfloat16",
        show_progress=False,
        max_num_batched_tokens=8192,
        max_num_seqs=max(batches),
        cuda_graph_batch_sizes=tuple(sorted(set(batches))),
    )
    build_s = time.perf_counter() - built
    result: dict[str, object] = {
        "label": args.label or root.name,
        "gpu": torch.cuda.get_device_name(),
        "build_s": round(build_s, 1),
    }
    for batch in batches:
        times = step_times(llm, batch, args.steps)
        result[f"b{batch}_median_ms"] = round(statistics.median(times) * 1e3, 3)
        result[f"b{batch}_p10_ms"] = round(sorted(times)[len(times) // 10] * 1e3, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
