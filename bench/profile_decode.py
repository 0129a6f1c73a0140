"""Where a decode step's time goes: host phases of engine.step() and GPU kernel time.

    python bench/profile_decode.py [--batch 1 64]

For each batch size (context ~1k, Llama-3-8B shape, dummy bf16): the median wall time of each
stage of a step (schedule, build inputs, forward incl. CUDA-graph replay, logits, sampler,
update + outputs), and from torch.profiler the GPU-busy time per step, so host overhead that
leaves the GPU idle is visible as step time minus GPU time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, sync, write_json  # noqa: E402
from bench.engine import CTX, PRESET, random_prompts  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.runner.inputs import build_step_inputs  # noqa: E402


def staged_step(llm: LLM) -> dict[str, float]:
    engine, runner = llm.engine, llm.engine.runner
    marks = [time.perf_counter()]
    out = engine.scheduler.schedule()
    marks.append(time.perf_counter())
    host = build_step_inputs(out, engine.config.block_size)
    marks.append(time.perf_counter())
    hidden = runner.forward(host)
    sync()
    marks.append(time.perf_counter())
    logits = runner.compute_logits(hidden)
    sync()
    marks.append(time.perf_counter())
    requests = [s for s in out.scheduled if s.sample]
    result = runner.sampler(logits, requests)
    marks.append(time.perf_counter())
    from engine.scheduler.output import RunnerOutput

    ro = RunnerOutput({r.request_id: t for r, t in zip(requests, result.token_ids)})
    updated = engine.scheduler.update(out, ro)
    [engine._output(r) for r in updated]
    marks.append(time.perf_counter())
    names = ["schedule", "build_inputs", "forward", "logits", "sampler", "update+outputs"]
    return {n: b - a for n, a, b in zip(names, marks, marks[1:])}


def gpu_time_per_step(llm: LLM, steps: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.engine.step()
        sync()
    total_us = sum(
        e.device_time_total
        for e in prof.key_averages()
        if e.device_time_total > 0 and e.key and not e.key.startswith("ProfilerStep")
    )
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return (kernel_us or total_us) / 1e6 / steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    llm = LLM(f"preset:{PRESET}", load_format="dummy", dtype="bfloat16", show_progress=False)
    engine = llm.engine
    rows, report = [], {}
    for b in args.batch:
        ids = [f"p{b}-{i}" for i in range(b)]
        params = SamplingParams(temperature=0.0, max_tokens=10 * args.steps + 64, ignore_eos=True)
        for rid, prompt in zip(ids, random_prompts(b, CTX, engine.vocab_size, b)):
            engine.add_request(rid, prompt, params)
        while engine.stats().num_waiting or any(
            engine.scheduler.get_request(r).num_computed_tokens < CTX for r in ids
        ):
            engine.step()
        for _ in range(5):
            engine.step()
        stages = [staged_step(llm) for _ in range(args.steps)]
        med = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
        wall = []
        for _ in range(args.steps):
            sync()
            t = time.perf_counter()
            engine.step()
            wall.append(time.perf_counter() - t)
        step = statistics.median(wall)
        gpu = gpu_time_per_step(llm, 10)
        engine.abort(ids)
        rows.append(
            [b, f"{step * 1e3:.2f}", f"{gpu * 1e3:.2f}", f"{(step - gpu) * 1e3:.2f}"]
            + [f"{med[k] * 1e3:.2f}" for k in med]
        )
        report[f"b{b}"] = {"step_s": step, "gpu_s": gpu, "stages_s": med}
    print_table(
        "decode step anatomy (ms, medians)",
        [
            "batch",
            "step",
            "GPU busy",
            "GPU idle",
            *["schedule", "inputs", "forward", "logits", "sampler", "update"],
        ],
        rows,
    )
    write_json("profile_decode", report)


if __name__ == "__main__":
    main()
