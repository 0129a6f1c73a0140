"""Speculative decoding on one GPU: what a verification step costs, and the speedup that the
acceptance measured on real text buys (Llama-3-8B shape, DUMMY bf16 weights).

    python bench/spec_cost.py [--batches 1,4,16,64,256] [--ks 1,2,4,8] [--acceptance JSON]

With dummy weights the model's own drafts mean nothing, so the two halves are measured apart:
  * cost: for each batch B, B requests at context ~1k decode with a proposer that always offers
    exactly k drafts (random tokens: nearly all rejected, so every step verifies k + 1 positions
    per request); the engine's whole step (schedule, propose, verify forward, update) is timed
    against a plain decode step of the same requests (k = 0), in the same run, the k values
    interleaved step by step so that the growing context weighs on each alike;
  * benefit: the mean accepted length per verify step, L(k) = accepted drafts + 1, measured on
    SmolLM2-135M-Instruct on real text (bench/spec_acceptance.py writes that JSON);
  * speedup(B, k) = L(k) * t_decode(B) / (t_verify(B, k) + t_proposer(B, k)): tokens per
    second with speculation over tokens per second without. It is computed from measured step
    costs and measured acceptance, not observed end to end: say so next to every figure.
The n-gram proposer's own host cost per step at B rows of 1k-token contexts (its incremental
index, bench/ngram_cost.py) is timed too and is t_proposer in the n-gram rows (it runs on the
host before the forward pass: it adds to the step); the other proposers' cost is not measured
here (t_proposer = 0: their speedups are upper bounds).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_name, print_table, sync, write_json  # noqa: E402
from bench.ngram_cost import index_step_seconds  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.scheduler.output import RunnerOutput, ScheduledRequest  # noqa: E402
from engine.spec.lookahead import LookaheadPolicy  # noqa: E402
from engine.utils.math import cdiv  # noqa: E402

CTX = 1024


class FixedDrafts:
    """A proposer that always offers every slot it is given (random tokens): the verify
    step's worst case, which the cost half measures."""

    observes = False

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.rng = random.Random(0)

    def propose(self, rows: Sequence[ScheduledRequest]) -> list[list[int]]:
        return [[self.rng.randrange(self.vocab) for _ in range(s.num_lookahead)] for s in rows]

    def forget(self, request_ids: Sequence[str]) -> None:
        pass

    def observe(
        self, rows: Sequence[ScheduledRequest], hidden: torch.Tensor, output: RunnerOutput
    ) -> None:
        pass


def set_k(llm: LLM, k: int) -> None:
    sched = llm.engine.scheduler
    # every row verifies k drafts at every batch: the cost half measures what the default
    # batch limit (lookahead.VERIFY_TOKENS_MAX) would otherwise switch off
    policy = LookaheadPolicy(k, disable_above=1 << 30, dynamic=False) if k else None
    sched.config = replace(sched.config, speculation=policy)


def start_batch(llm: LLM, batch: int, decode_steps: int, prefix: str) -> list[str]:
    """`batch` requests of CTX random tokens, stepped until every one holds its first token;
    each may then decode `decode_steps` more (with speculation off). Returns their ids."""
    engine = llm.engine
    warm = cdiv(batch * CTX, engine.config.max_num_batched_tokens) + 4
    params = SamplingParams(temperature=0.0, max_tokens=warm + decode_steps, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch + (prefix == "w"))
    ids = [f"{prefix}{batch}-{i}" for i in range(batch)]
    set_k(llm, 0)
    for rid in ids:
        engine.add_request(
            rid, torch.randint(0, engine.vocab_size, (CTX,), generator=gen).tolist(), params
        )
    started: set[str] = set()
    while len(started) < batch:
        started.update(o.request_id for o in engine.step())
    return ids


def step_times(llm: LLM, batch: int, ks: list[int], steps: int) -> dict[int, float]:
    """Median engine-step seconds at each k for `batch` requests decoding at context ~CTX.

    The k values are interleaved, one timed step each per round (after one untimed step that
    switches k), so the context growing by a token per step weighs on every k alike: timed
    one k after another, the later k values read a longer KV (at batch 256 attention is ~40%
    of the step) and looked ~1.5% per phase dearer. A first untimed round warms every shape.
    """
    engine = llm.engine
    engine.overlap = False  # one step at a time, each timed alone (shipped_times overlaps)
    ids = start_batch(llm, batch, (steps + 1) * 2 * sum(k + 1 for k in ks) + 8, "s")
    times: dict[int, list[float]] = {k: [] for k in ks}
    for round_ in range(steps + 1):
        for k in ks:
            set_k(llm, k)
            engine.step()  # the switch: absorbs the change of k (a call may complete the last)
            sync()
            start = time.perf_counter()
            engine.step()
            sync()
            if round_:
                times[k].append(time.perf_counter() - start)
    engine.abort(ids)
    return {k: statistics.median(t) for k, t in times.items()}


def shipped_times(llm: LLM, batch: int, max_k: int, steps: int) -> tuple[float, float]:
    """Mean step seconds over `steps` steps (one device sync at each end, so overlap
    scheduling works as in the engine): without speculation, then with n-gram speculation as
    shipped (k = `max_k`, dynamic, the default batch rule of engine.spec.lookahead). The
    drafts are random, so every one is rejected: speculation's worst case, where each step
    still gives one token per request and the two times compare tokens per second."""
    engine = llm.engine
    engine.overlap = True
    ids = start_batch(llm, batch, 2 * (steps + 4) * 2, "w")
    sched = engine.scheduler

    def window(policy: LookaheadPolicy | None) -> float:
        sched.config = replace(sched.config, speculation=policy)
        for _ in range(3):
            engine.step()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        sync()
        return (time.perf_counter() - start) / steps

    plain = window(None)
    shipped = window(LookaheadPolicy(max_k, None, dynamic=True))
    engine.abort(ids)
    while engine.has_unfinished():
        engine.step()
    return plain, shipped


def ngram_host_cost(batch: int, k: int, ctx: int = CTX) -> float:
    """Seconds per step the engine's n-gram proposer (its incremental index) takes for `batch`
    rows of `ctx` random tokens, each one token longer than at its previous call (no match:
    its worst case). Measured by bench/ngram_cost.py's `index_step_seconds`."""
    return index_step_seconds(batch, k, ctx, matching=False, reps=7)[0]


def load_acceptance(path: str | None) -> dict[str, dict[int, float]]:
    """method -> k -> mean accepted length per verify step, from bench/spec_acceptance.py."""
    if path is None or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    out: dict[str, dict[int, float]] = {}
    for row in data.get("rows", []):
        out.setdefault(f"{row['method']} / {row['task']}", {})[int(row["k"])] = float(
            row["mean_accepted_length"]
        )
    return out


def print_speedups(
    acceptance: dict[str, dict[int, float]],
    costs: dict[int, dict[int, float]],
    host: dict[tuple[int, int], float],
    batches: list[int],
    ks: list[int],
    plain: dict[int, float],
) -> dict[str, float]:
    """One table per method: L(k) x t_decode / (t_verify + t_proposer), t_decode being the
    overlapped decode step (`plain`: what the engine runs without speculation). Only the
    n-gram proposer's host cost is measured here; the other proposers' own cost (a draft
    model's or head's forward passes) is left out, so their figures are upper bounds."""
    speedups = {}
    for name, by_k in acceptance.items():
        ngram = name.split(" / ")[0] == "ngram"
        table = []
        for b in batches:
            row: list[object] = [b]
            for k in ks[1:]:
                if k in by_k:
                    proposer_s = host[b, k] if ngram else 0.0
                    s = by_k[k] * plain[b] / (costs[b][k] + proposer_s)
                    speedups[f"{name} b{b} k{k}"] = s
                    row.append(f"{s:.2f}x (L={by_k[k]:.2f})")
                else:
                    row.append("-")
            table.append(row)
        formula = (
            "L(k) x t_decode(overlapped) / (t_verify + t_ngram_host)"
            if ngram
            else "L(k) x t_decode(overlapped) / t_verify (the proposer's own cost NOT measured: "
            "an upper bound)"
        )
        print_table(
            f"speedup = {formula}, {name} (COMPUTED from measured step costs "
            "and acceptance measured on SmolLM2-135M; dummy 8B weights)",
            ["batch", *(f"k={k}" for k in ks[1:])],
            table,
        )
    return speedups


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,4,16,64,256")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--acceptance", default="docs/results/2026-12-07/spec/acceptance.json")
    parser.add_argument("--preset", default="llama-3-8b", help="tiny: a CPU rehearsal")
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.preset == "llama-3-8b":
        sys.exit("bench/spec_cost.py needs a CUDA GPU")
    batches = [int(x) for x in args.batches.split(",")]
    ks = [0, *(int(x) for x in args.ks.split(","))]
    llm = LLM(
        f"preset:{args.preset}",
        load_format="dummy",
        dtype="bfloat16" if torch.cuda.is_available() else "float32",
        show_progress=False,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        speculative_config={"method": "ngram", "num_speculative_tokens": max(ks)},
    )
    llm.engine.runner.proposer = FixedDrafts(llm.engine.vocab_size)
    print(f"{gpu_name()}: preset {args.preset} (dummy weights), context ~{CTX}")
    costs = {b: step_times(llm, b, ks, args.steps) for b in batches}
    rows = [
        [b, *(f"{costs[b][k] * 1e3:.2f} ({costs[b][k] / costs[b][0]:.2f}x)" for k in ks)]
        for b in batches
    ]
    print_table(
        "engine step ms (x the plain decode step) with k drafts per request verified",
        ["batch", *(f"k={k}" for k in ks)],
        rows,
    )
    host = {(b, k): ngram_host_cost(b, k) for b in batches for k in ks if k}
    print_table(
        "n-gram proposer host ms per step (incremental index; no match: its worst case), "
        "1k-token contexts",
        ["batch", *(f"k={k}" for k in ks if k)],
        [[b, *(f"{host[b, k] * 1e3:.2f}" for k in ks if k)] for b in batches],
    )
    shipped = {b: shipped_times(llm, b, max(ks), args.steps * 2) for b in batches}
    plain = {b: t for b, (t, _) in shipped.items()}
    print_table(
        f"as shipped: n-gram k={max(ks)}, dynamic, default batch rule, overlap scheduling; "
        "every draft rejected (worst case: one token per request per step either way)",
        ["batch", "no spec ms", "spec ms", "spec tok/s / no-spec tok/s"],
        [[b, f"{p * 1e3:.2f}", f"{s * 1e3:.2f}", f"{p / s:.2f}"] for b, (p, s) in shipped.items()],
    )
    speedups = print_speedups(load_acceptance(args.acceptance), costs, host, batches, ks, plain)
    print(
        "peer (published, not run here): SGLang EAGLE-3 on Llama-3.1-8B, MT-Bench, H100, batch 1: 2.36x"
    )
    write_json(
        "spec_cost",
        {
            "gpu": gpu_name(),
            "ctx": CTX,
            "step_s": {str(b): {str(k): t for k, t in c.items()} for b, c in costs.items()},
            "ngram_host_s": {f"{b},{k}": t for (b, k), t in host.items()},
            "shipped_s": {str(b): {"no_spec": p, "spec": s} for b, (p, s) in shipped.items()},
            "speedup": speedups,
        },
    )


if __name__ == "__main__":
    main()
