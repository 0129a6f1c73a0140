"""Tensor parallelism on one host: TP = 1 versus TP = N in the same run (Llama-3-8B shape, bf16,
dummy weights that are the same logical model at every TP size).

    python bench/tp.py [--tp 2] [--model preset:llama-3-8b]

Measures, for each TP size: greedy tokens of 8 prompts (the first 16 must be identical across
TP sizes), batch-1 decode step time and tokens/s, batch-64 decode throughput; and for TP > 1
the share of rank 0's decode step spent in all-reduce: torch.profiler over decode steps, the
summed device time of NCCL kernels (which includes waiting for the peer) divided by the
unprofiled wall time per step. Prints a table; writes $OUT/tp.json when OUT is set.
The batch-1 figure sits next to its weight-streaming floor (bf16 weights / HBM bandwidth / N).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not bench/engine.py

from engine import LLM, SamplingParams  # noqa: E402

PROMPT_LEN = 128  # tokens per prompt in the decode measurements
HBM_TBPS = {"H100": 3.35, "H200": 4.8}  # datasheet peak; the roofline only


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(min(1000, vocab // 2), vocab, (length,), generator=gen).tolist() for _ in range(n)]


def _decode_rate(llm: LLM, batch: int, steps: int, profile: bool) -> dict[str, float]:
    """Time `steps` decode steps of `batch` requests after their prefill."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 40, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, PROMPT_LEN, engine.vocab_size, seed=batch)):
        engine.add_request(f"b{batch}-{i}", p, params)
    while engine.stats().num_waiting > 0 or engine.stats().num_running < batch:
        engine.step()
    for _ in range(5):
        engine.step()  # past any chunked prefill: every request is decoding
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / steps
    result = {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
    if profile:
        result["allreduce_ms_per_step"] = _nccl_ms_per_step(llm, 20)
        result["allreduce_share"] = result["allreduce_ms_per_step"] / result["step_ms"]
    engine.abort([f"b{batch}-{i}" for i in range(batch)])
    return result


def _nccl_ms_per_step(llm: LLM, steps: int) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.engine.step()
        torch.cuda.synchronize()
    total_us = 0.0
    for event in prof.key_averages():
        if "nccl" in event.key.lower():
            total_us += getattr(event, "device_time_total", 0.0) or getattr(event, "cuda_time_total", 0.0)
    return total_us / 1e3 / steps


def run_tp(model: str, tp: int, decode_steps: int, batch: int, enforce_eager: bool = False,
           profile: bool = False) -> dict:
    llm = LLM(model, load_format="dummy", dtype="bfloat16", tensor_parallel_size=tp, max_model_len=2048,
              max_num_seqs=max(batch, 8), gpu_memory_utilization=0.85, show_progress=False,
              enforce_eager=enforce_eager)
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        tokens = [o.token_ids for o in llm.generate(_prompts(8, 32, llm.engine.vocab_size, seed=0), greedy)]
        print(f"TP={tp}: loaded, greedy done", flush=True)
        out = {
            "tp": tp,
            "tokens": tokens,
            "batch1": _decode_rate(llm, 1, decode_steps, profile=profile and tp > 1),
            f"batch{batch}": _decode_rate(llm, batch, decode_steps, profile=profile and tp > 1),
            "weight_bytes_per_rank": sum(p.numel() * p.element_size()
                                         for p in llm.engine.runner.model.parameters()),
        }
        print(f"TP={tp}: batch 1 {out['batch1']}, batch {batch} {out[f'batch{batch}']}", flush=True)
        return out
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()


def _floor_ms(weight_bytes: int) -> float | None:
    name = torch.cuda.get_device_name()
    tbps = next((v for k, v in HBM_TBPS.items() if k in name), None)
    return None if tbps is None else weight_bytes / (tbps * 1e12) * 1e3


def report(base: dict, tp: dict, batch: int) -> dict:
    same = [a == b for a, b in zip(base["tokens"], tp["tokens"])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(base["tokens"], tp["tokens"])]
    b1, t1 = base["batch1"], tp["batch1"]
    bb, tb = base[f"batch{batch}"], tp[f"batch{batch}"]
    summary = {
        "device": torch.cuda.get_device_name(), "tp": tp["tp"], "prompts_identical": sum(same),
        "first_divergence_per_prompt": first_diff,
        "batch1_step_ms": {"tp1": b1["step_ms"], f"tp{tp['tp']}": t1["step_ms"]},
        "batch1_floor_ms": {"tp1": _floor_ms(base["weight_bytes_per_rank"]),
                            f"tp{tp['tp']}": _floor_ms(tp["weight_bytes_per_rank"])},
        "batch1_speedup": b1["step_ms"] / t1["step_ms"],
        f"batch{batch}_tokens_per_s": {"tp1": bb["tokens_per_s"], f"tp{tp['tp']}": tb["tokens_per_s"]},
        f"batch{batch}_speedup": tb["tokens_per_s"] / bb["tokens_per_s"],
        "allreduce_share_batch1": t1.get("allreduce_share"),
        f"allreduce_share_batch{batch}": tb.get("allreduce_share"),
        "allreduce_method": "torch.profiler on rank 0: NCCL kernel device time / unprofiled step wall time",
    }
    _print(summary, batch)
    return summary


def _print(s: dict, batch: int) -> None:
    n = s["tp"]
    print(f"device: {s['device']}   greedy prompts identical (16 tokens): {s['prompts_identical']}/8 "
          f"first divergence: {s['first_divergence_per_prompt']}")
    print(f"{'figure':34s} {'TP=1':>12s} {f'TP={n}':>12s} {'ratio':>8s}")
    b1 = s["batch1_step_ms"]
    print(f"{'batch-1 decode step (ms)':34s} {b1['tp1']:12.3f} {b1[f'tp{n}']:12.3f} {s['batch1_speedup']:7.2f}x")
    fl = s["batch1_floor_ms"]
    if fl["tp1"] is not None:
        print(f"{'  weight-streaming floor (ms)':34s} {fl['tp1']:12.3f} {fl[f'tp{n}']:12.3f}")
    bt = s[f"batch{batch}_tokens_per_s"]
    print(f"{f'batch-{batch} decode (tokens/s)':34s} {bt['tp1']:12.0f} {bt[f'tp{n}']:12.0f} "
          f"{s[f'batch{batch}_speedup']:7.2f}x")
    if s["allreduce_share_batch1"] is None:
        print("all-reduce share: not measured (run with --profile)")
        return
    print(f"{'all-reduce share of step, batch 1':34s} {'':12s} {100 * s['allreduce_share_batch1']:11.1f}%")
    print(f"{f'all-reduce share of step, batch {batch}':34s} {'':12s} "
          f"{100 * s[f'allreduce_share_batch{batch}']:11.1f}%   ({s['allreduce_method']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="preset:llama-3-8b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (both TP sizes)")
    parser.add_argument("--profile", action="store_true", help="all-reduce share via torch.profiler")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    base = run_tp(args.model, 1, args.decode_steps, args.batch, args.enforce_eager, args.profile)
    tp = run_tp(args.model, args.tp, args.decode_steps, args.batch, args.enforce_eager, args.profile)
    summary = report(base, tp, args.batch) | {"cuda_graphs": not args.enforce_eager}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tp.json"), "w") as f:
            json.dump({"summary": summary, "tp1": base, f"tp{args.tp}": tp}, f, indent=1)


if __name__ == "__main__":
    main()
