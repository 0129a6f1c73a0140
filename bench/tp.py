"""Tensor parallelism on one host: TP = 1 versus TP = N in the same run (Llama-3-8B shape, bf16,
dummy weights that are the same logical model at every TP size).

    python bench/tp.py [--tp 2] [--model preset:llama-3-8b]

Engines measured, one after the other, each in its own process: TP = 1, then TP = N for each
`--variants` entry, a `tp_all_reduce` mode: "auto" (what the engine picks: the all-reduce fused
with the residual add and RMSNorm when available), "symm_mem" (the one-shot kernel, unfused),
"nccl", "fused", and "skip" (no collective at all: wrong tokens, timing only). For each: greedy tokens of 8 prompts (the first 16 must be identical
to TP = 1), batch-1 decode step time and tokens/s, batch-64 decode throughput.

The all-reduce share of a step = (step with all-reduces - step without) / step with, for the
same engine build and batch: the ablation includes everything the collectives cost on the
critical path (kernel time and waiting for the slower rank), with CUDA graphs on.
(`--profile` adds torch.profiler's per-kernel device time on rank 0, CUDA graphs included.)
Prints a table; writes $OUT/tp.json when OUT is set. The batch-1 figure sits next to its
weight-streaming floor (bf16 weights / HBM bandwidth / N).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not bench/engine.py

from bench.common import gpu_name, sync  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.distributed.parallel_state import AllReduceMode  # noqa: E402
from engine.runner import model_runner as model_runner_module  # noqa: E402

PROMPT_LEN = 128  # tokens per prompt in the decode measurements
TOP_N = 5  # logprobs kept per greedy token: the margin at a divergence
HBM_TBPS = {"H100": 3.35, "H200": 4.8}  # datasheet peak; the roofline only


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randint(min(1000, vocab // 2), vocab, (length,), generator=gen).tolist()
        for _ in range(n)
    ]


class _StepBreakdown:
    """Where rank 0's decode step goes: host timers around the engine's stages and CUDA events
    around its device work, installed by wrapping the engine's own methods (nothing changes in
    the engine). Host stages: schedule, inputs (host step tensors), publish (to the followers),
    forward (host side: input copies and the graph launch), logits (LM head launch), sample (the
    sampler, including its wait for the device), update (scheduler bookkeeping). Device:
    `graph_ms` from before the decode graph's input copies to its end, `device_ms` from the
    first forward kernel to the sampled tokens; `wall - device` is host time the GPU does not
    hide."""

    STAGES = ("schedule", "inputs", "publish", "forward", "logits", "sample", "update")

    def __init__(self, llm: LLM) -> None:
        engine, runner = llm.engine, llm.engine.runner
        self.host = {name: 0.0 for name in self.STAGES}
        self.events: list[tuple[str, Any, Any]] = []
        self._undo: list[tuple[Any, str, Any]] = []
        self._timed(engine.scheduler, "schedule", "schedule")
        self._timed(engine.scheduler, "update", "update")
        self._timed(model_runner_module, "build_step_inputs", "inputs")
        self._timed(runner, "forward", "forward", device_start=True)
        self._timed(runner, "compute_logits", "logits")
        self._timed(runner, "sampler", "sample", device_end=True)
        scope = runner.step_scope

        @contextlib.contextmanager
        def publish_scope(host: Any) -> Iterator[None]:  # the publish happens on entering the scope
            t = time.perf_counter()
            with scope(host):
                self.host["publish"] += time.perf_counter() - t
                yield

        self._set(runner, "step_scope", publish_scope)
        if runner.graphs is not None and torch.cuda.is_available():
            run = runner.graphs.run

            def graph_run(host, dev):
                start, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                start.record()
                out = run(host, dev)
                end.record()
                self.events.append(("graph", start, end))
                return out

            self._set(runner.graphs, "run", graph_run)
        self._device_start: Any = None

    def _set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def _timed(
        self, obj: Any, name: str, stage: str, device_start: bool = False, device_end: bool = False
    ) -> None:
        fn = getattr(obj, name)

        def wrapper(*args, **kwargs):
            if device_start and torch.cuda.is_available():
                self._device_start = torch.cuda.Event(enable_timing=True)
                self._device_start.record()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host[stage] += time.perf_counter() - t
            if device_end and self._device_start is not None:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.events.append(("device", self._device_start, end))
                self._device_start = None
            return out

        self._set(obj, name, wrapper)

    def remove(self) -> None:
        for obj, name, old in reversed(self._undo):
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

    def per_step_ms(self, steps: int) -> dict[str, float]:
        sync()
        out = {f"host_{k}_ms": v * 1e3 / steps for k, v in self.host.items()}
        for kind in ("graph", "device"):
            times = [s.elapsed_time(e) for k, s, e in self.events if k == kind]
            if times:
                out[f"{kind}_ms"] = sorted(times)[len(times) // 2]
        return out


def _decode_rate(llm: LLM, batch: int, steps: int, profile: bool) -> dict[str, Any]:
    """Time `steps` decode steps of `batch` requests after their prefill, then as many again
    under _StepBreakdown (timers cost a little: the headline figure comes from the clean run)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 40, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, PROMPT_LEN, engine.vocab_size, seed=batch)):
        engine.add_request(f"b{batch}-{i}", p, params)
    while engine.stats().num_waiting > 0 or engine.stats().num_running < batch:
        engine.step()
    for _ in range(5):
        engine.step()  # past any chunked prefill: every request is decoding
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    step_s = (time.perf_counter() - start) / steps
    result: dict[str, Any] = {"step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
    breakdown = _StepBreakdown(llm)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        result["profiled_step_ms"] = (time.perf_counter() - start) / steps * 1e3
        result |= breakdown.per_step_ms(steps)
    finally:
        breakdown.remove()
    if profile and torch.cuda.is_available():
        result["kernels"] = _kernel_table(
            llm, 10, f"TP={llm.engine.config.tensor_parallel_size} batch {batch}"
        )
    engine.abort([f"b{batch}-{i}" for i in range(batch)])
    return result


def _kernel_table(llm: LLM, steps: int, label: str) -> list[dict]:
    """torch.profiler's device time of every kernel over `steps` steps on rank 0 (the kernels
    inside CUDA-graph replays included), per step, largest first; printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.engine.step()
        sync()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) or 0.0
        if us > 0:
            rows.append(
                {
                    "kernel": event.key,
                    "us_per_step": us / steps,
                    "calls_per_step": event.count / steps,
                }
            )
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(
        f"{label}: kernel time {total / 1e3:.3f} ms per step over {sum(r['calls_per_step'] for r in rows):.0f} "
        "kernels (torch.profiler, rank 0)"
    )
    for r in rows[:24]:
        print(
            f"  {r['us_per_step']:9.1f} us {100 * r['us_per_step'] / total:5.1f}% {r['calls_per_step']:6.1f}x "
            f"{r['us_per_step'] / r['calls_per_step']:7.2f} us each  {r['kernel'][:90]}"
        )
    return rows


GRAPH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # every engine here captures the same decode buckets


def run_tp(
    model: str,
    tp: int,
    decode_steps: int,
    batch: int,
    enforce_eager: bool = False,
    profile: bool = False,
    all_reduce: AllReduceMode = AllReduceMode.AUTO,
    dtype: str = "bfloat16",
    fp32_reduce: bool = False,
) -> dict:
    t0 = time.perf_counter()
    llm = LLM(
        model,
        load_format="dummy",
        dtype=dtype,
        tensor_parallel_size=tp,
        max_model_len=2048,
        max_num_seqs=max(batch, 8),
        gpu_memory_utilization=0.80,
        show_progress=False,
        enforce_eager=enforce_eager,
        tp_all_reduce=all_reduce,
        tp_fp32_reduce_max_tokens=1024 if fp32_reduce else 0,
        cuda_graph_batch_sizes=tuple(b for b in GRAPH_SIZES if b <= max(batch, 8)),
    )
    label = (
        f"TP={tp} all_reduce={llm.engine.runner.all_reduce_mode} "
        f"fp32 reduce <= {llm.engine.runner.fp32_reduce_max_tokens} tokens"
    )
    try:
        greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=TOP_N)
        prompts = _prompts(8, 32, llm.engine.vocab_size, seed=0)
        outs = llm.generate(prompts, greedy)
        tokens = [o.token_ids for o in outs]
        top = [[lp.top for lp in (o.logprobs or [])] for o in outs]
        # The TP = 1 peer: the same engine, each prompt alone (other GEMM shapes and kernels)
        alone = [llm.generate([p], greedy)[0].token_ids for p in prompts] if tp == 1 else None
        executor = getattr(llm.engine, "tp", None)
        channel = getattr(executor, "_channel", None)
        print(f"{label}: loaded in {time.perf_counter() - t0:.0f} s, greedy done", flush=True)
        out = {
            "tp": tp,
            "all_reduce": llm.engine.runner.all_reduce_mode,
            "step_channel": getattr(channel, "transport", None),
            "tokens": tokens,
            "top_logprobs": top,
            "tokens_one_prompt_at_a_time": alone,
            "batch1": _decode_rate(llm, 1, decode_steps, profile=profile),
            f"batch{batch}": _decode_rate(llm, batch, decode_steps, profile=profile),
            "weight_bytes_per_rank": sum(
                p.numel() * p.element_size() for p in llm.engine.runner.model.parameters()
            ),
        }
        print(f"{label}: batch 1 {out['batch1']}, batch {batch} {out[f'batch{batch}']}", flush=True)
        return out
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _floor_ms(weight_bytes: int) -> float | None:
    name = gpu_name()
    tbps = next((v for k, v in HBM_TBPS.items() if k in name), None)
    return None if tbps is None else weight_bytes / (tbps * 1e12) * 1e3


def _first_diffs(base_tokens: list[list[int]], tokens: list[list[int]]) -> list[int | None]:
    return [
        next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        for a, b in zip(base_tokens, tokens)
    ]


def _identical(base: dict, run: dict) -> tuple[int, list[int | None]]:
    first_diff = _first_diffs(base["tokens"], run["tokens"])
    return sum(d is None for d in first_diff), first_diff


def _margins(
    base: dict, first_diff: list[int | None], tokens: list[list[int]]
) -> list[float | None]:
    """At each first divergence: TP = 1's log-probability of its own token minus that of the
    token the other engine chose (None when that token is outside TP = 1's top N): a near-tie
    (a margin of a few hundredths) is a rounding flip, a large one would be a wrong result."""
    out: list[float | None] = []
    for p, i in enumerate(first_diff):
        if i is None:
            continue
        top = dict((int(t), lp) for t, lp in base["top_logprobs"][p][i])
        chosen = tokens[p][i]
        out.append(None if chosen not in top else top[base["tokens"][p][i]] - top[chosen])
    return out


def _tp1_margins(base: dict) -> float:
    """Median over TP = 1's greedy tokens of the log-probability gap between its top two."""
    gaps = sorted(t[0][1] - t[1][1] for rows in base["top_logprobs"] for t in rows if len(t) > 1)
    return gaps[len(gaps) // 2] if gaps else float("nan")


def report(base: dict, runs: dict[str, dict], batch: int) -> dict:
    """`runs`: variant name -> run_tp() result; "skip" (if present) is the no-collective ablation."""
    skip = runs.get("skip")  # the ablation of the default (float32) reduce
    rows = {}
    for name, run in {"tp1": base, **runs}.items():
        same, diff = _identical(base, run)
        row = {
            "margins_at_divergence": None
            if name == "skip"
            else _margins(base, diff, run["tokens"]),
            "tp": run["tp"],
            "all_reduce": run["all_reduce"],
            "step_channel": run["step_channel"],
            "prompts_identical_to_tp1": None if name in ("tp1", "skip") else same,
            "first_divergence": None if name in ("tp1", "skip") else diff,
            "batch1_step_ms": run["batch1"]["step_ms"],
            "batch1_floor_ms": _floor_ms(run["weight_bytes_per_rank"]),
            "batch1_speedup": base["batch1"]["step_ms"] / run["batch1"]["step_ms"],
            f"batch{batch}_tokens_per_s": run[f"batch{batch}"]["tokens_per_s"],
            f"batch{batch}_speedup": run[f"batch{batch}"]["tokens_per_s"]
            / base[f"batch{batch}"]["tokens_per_s"],
            "breakdown": {
                key: {k: v for k, v in run[key].items() if k.endswith("_ms")}
                for key in ("batch1", f"batch{batch}")
            },
        }
        if skip is not None and name not in ("tp1", "skip"):
            for key in ("batch1", f"batch{batch}"):
                with_ar, without = run[key]["step_ms"], skip[key]["step_ms"]
                row[f"allreduce_ms_{key}"] = with_ar - without
                row[f"allreduce_share_{key}"] = (with_ar - without) / with_ar
        for key in ("batch1", f"batch{batch}"):
            if "allreduce_share" in run[key]:
                row[f"profiled_allreduce_share_{key}"] = run[key]["allreduce_share"]
        rows[name] = row
    peer = base.get("tokens_one_prompt_at_a_time")
    peer_diff = _first_diffs(base["tokens"], peer) if peer else []
    summary = {
        "device": gpu_name(),
        "rows": rows,
        "tp1_alone_identical_to_tp1_batched": sum(d is None for d in peer_diff) if peer else None,
        "tp1_alone_margins_at_divergence": _margins(base, peer_diff, peer) if peer else None,
        "tp1_median_top2_gap": _tp1_margins(base),
        "allreduce_method": "ablation: step time minus the same engine's step with tp_all_reduce='skip'",
    }
    _print(summary, batch)
    return summary


def _fmt(values: list | None) -> str:
    return (
        "-"
        if not values
        else "[" + ", ".join("?" if v is None else f"{v:.3f}" for v in values) + "]"
    )


def _print(s: dict, batch: int) -> None:
    print(f"device: {s['device']}")
    print(
        f"{'engine':18s} {'all-reduce':>10s} {'channel':>8s} {'same 16 tok':>11s} {'b1 ms':>8s} {'floor':>7s} "
        f"{'b1 x':>6s} {f'b{batch} tok/s':>11s} {f'b{batch} x':>6s} {'AR share b1':>11s} {f'AR share b{batch}':>12s}"
    )
    for name, r in s["rows"].items():
        same = (
            "-" if r["prompts_identical_to_tp1"] is None else f"{r['prompts_identical_to_tp1']}/8"
        )
        floor = "-" if r["batch1_floor_ms"] is None else f"{r['batch1_floor_ms']:.2f}"
        share1 = r.get("allreduce_share_batch1")
        shareb = r.get(f"allreduce_share_batch{batch}")
        print(
            f"{name:18s} {r['all_reduce']:>10s} {str(r['step_channel']):>8s} {same:>11s} "
            f"{r['batch1_step_ms']:8.3f} {floor:>7s} {r['batch1_speedup']:5.2f}x "
            f"{r[f'batch{batch}_tokens_per_s']:11.0f} {r[f'batch{batch}_speedup']:5.2f}x "
            f"{'-' if share1 is None else f'{100 * share1:.1f}%':>11s} "
            f"{'-' if shareb is None else f'{100 * shareb:.1f}%':>12s}"
        )
    print(
        f"greedy equality (16 tokens x 8 prompts, bf16): TP=1 against itself with each prompt alone: "
        f"{s['tp1_alone_identical_to_tp1_batched']}/8 identical, log-prob margins at divergence "
        f"{_fmt(s['tp1_alone_margins_at_divergence'])}; TP=1's median top-2 gap {s['tp1_median_top2_gap']:.3f}"
    )
    for name, r in s["rows"].items():
        if r["margins_at_divergence"]:
            print(
                f"  {name}: margins at divergence {_fmt(r['margins_at_divergence'])}, first divergence "
                f"{r['first_divergence']}"
            )
    print(
        "where rank 0's step goes (ms per step; host stages by wall clock, device by CUDA events):"
    )
    stages = ["profiled_step_ms", "device_ms", "graph_ms"] + [
        f"host_{k}_ms" for k in _StepBreakdown.STAGES
    ]
    print(
        f"{'engine':18s} {'batch':>5s} " + " ".join(f"{k.replace('_ms', ''):>14s}" for k in stages)
    )
    for name, r in s["rows"].items():
        for key in ("batch1", f"batch{batch}"):
            b = r["breakdown"][key]
            print(
                f"{name:18s} {key[5:]:>5s} "
                + " ".join(f"{b[k]:14.3f}" if k in b else f"{'-':>14s}" for k in stages)
            )
    print(
        f"all-reduce share: {s['allreduce_method']}; 'skip' rows compute wrong tokens by design. "
        "Targets: TP=2 batch-1 >= 1.8x, all-reduce <= 10% of the batch-1 step."
    )


def _run_isolated(args: argparse.Namespace, tp: int, variant: str, timeout_s: float) -> dict:
    """One engine in its own process: a TP group's symmetric memory and NCCL state live and die
    with it, and a hung engine costs at most `timeout_s`."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [
            sys.executable,
            __file__,
            "--model",
            args.model,
            "--decode-steps",
            str(args.decode_steps),
            "--batch",
            str(args.batch),
            "--dtype",
            args.dtype,
            "--one",
            f"{tp}:{variant}",
            "--result",
            f.name,
        ]
        cmd += ["--enforce-eager"] * args.enforce_eager + ["--profile"] * args.profile
        subprocess.run(cmd, timeout=timeout_s, check=True)
        with open(f.name) as result:
            return json.load(result)


def _variant(variant: str) -> tuple[AllReduceMode, str]:
    """ "fused-fp32reduce" -> (AllReduceMode.FUSED, "fp32reduce")."""
    mode, _, option = variant.partition("-")
    try:
        return AllReduceMode.parse(mode), option
    except ValueError as err:
        raise SystemExit(f"--variants: {err}") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="preset:llama-3-8b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument(
        "--variants",
        default="auto,symm_mem,skip",
        help="TP = N engines to run after TP = 1: tp_all_reduce modes, each optionally "
        "suffixed '-fp32reduce' (row-parallel partial sums reduced in float32)",
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="no CUDA graphs (every engine)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also torch.profiler's per-kernel device time on rank 0 (every engine but 'skip')",
    )
    parser.add_argument(
        "--engine-timeout", type=float, default=240.0, help="seconds per engine process"
    )
    parser.add_argument(
        "--one", help=argparse.SUPPRESS
    )  # "tp:variant": run one engine in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if args.one:
        tp, variant = args.one.split(":")
        mode, option = _variant(variant)
        out = run_tp(
            args.model,
            int(tp),
            args.decode_steps,
            args.batch,
            args.enforce_eager,
            args.profile and mode is not AllReduceMode.SKIP,
            all_reduce=mode,
            dtype=args.dtype,
            fp32_reduce=option == "fp32reduce",
        )
        with open(args.result, "w") as f:
            json.dump(out, f)
        return
    for variant in args.variants.split(","):
        _variant(variant)  # a misspelt mode fails here, not after the TP = 1 engine ran
    results: dict = {"args": vars(args)}
    base = results["tp1"] = _run_isolated(args, 1, "auto", args.engine_timeout)
    runs = {}
    for variant in args.variants.split(","):
        try:
            runs[variant] = _run_isolated(args, args.tp, variant, args.engine_timeout)
        except (
            subprocess.SubprocessError,
            OSError,
            ValueError,
        ) as err:  # report it, keep the others
            print(f"TP={args.tp} {variant}: failed: {err}", flush=True)
            results[f"failed_{variant}"] = str(err)
    results |= {f"tp{args.tp}_{k}": v for k, v in runs.items()}
    results["summary"] = report(base, runs, args.batch) | {"cuda_graphs": not args.enforce_eager}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tp.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
