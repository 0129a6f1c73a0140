"""Host cost of the n-gram proposer per engine step: the reference scan (`propose_ngram` over
each row's whole sequence, what NgramProposer did before its index) against the incremental
`NgramIndex` (what NgramProposer does now). CPU only; no model.

    python bench/ngram_cost.py [--batches 1,16,64,256] [--ctx 1024] [--k 4] [--reps 7]

Each of `batch` requests holds a `ctx`-token prompt; before every timed call one token is
appended to every row's output (a decode step), then one `propose` call for the whole batch is
timed; the median of `reps` calls is printed. Two contexts:
  * no match: random tokens of a 128k vocabulary (the scan's worst case: every n over the
    whole context);
  * match: a random 512-token span repeated, growing with the span's next token (the tail
    recurs 512 tokens back, so the scan stops half way).
The index's first call for a request (building it from the whole prompt, once per request)
is printed apart.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import print_table, write_json  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler.output import ScheduledRequest  # noqa: E402
from engine.spec.config import SpeculativeConfig  # noqa: E402
from engine.spec.ngram import propose_ngram  # noqa: E402
from engine.spec.proposer import NgramProposer  # noqa: E402

VOCAB = 128_000
PERIOD = 512
MIN_N, MAX_N = 1, 4  # SpeculativeConfig's defaults


def make_rows(
    batch: int, ctx: int, k: int, matching: bool, seed: int = 1
) -> list[ScheduledRequest]:
    """`batch` decode rows of `ctx` prompt tokens each, asking for `k` drafts."""
    rng = random.Random(seed)
    rows = []
    for i in range(batch):
        if matching:
            span = [rng.randrange(VOCAB) for _ in range(PERIOD)]
            prompt = (span * (ctx // PERIOD + 1))[:ctx]
        else:
            prompt = [rng.randrange(VOCAB) for _ in range(ctx)]
        rows.append(
            ScheduledRequest(
                request_id=f"r{i}",
                token_ids=[prompt[-1]],
                start_position=ctx - 1,
                block_ids=[0],
                sample=True,
                sampling_params=SamplingParams(),
                prompt_token_ids=prompt,
                output_token_ids=[],
                num_lookahead=k,
            )
        )
    return rows


def grow(rows: list[ScheduledRequest], matching: bool, rng: random.Random) -> None:
    """Append one token to every row's output, as a decode step does."""
    for row in rows:
        length = len(row.prompt_token_ids) + len(row.output_token_ids)
        if matching:
            row.output_token_ids.append(row.prompt_token_ids[length % PERIOD])
        else:
            row.output_token_ids.append(rng.randrange(VOCAB))


def _median_step(
    rows: list[ScheduledRequest], matching: bool, reps: int, call: Callable[[], object]
) -> float:
    rng = random.Random(2)
    times = []
    for _ in range(reps):
        grow(rows, matching, rng)
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scan_step_seconds(batch: int, k: int, ctx: int, matching: bool, reps: int) -> float:
    """Median seconds of one step of the reference scan over `batch` rows."""
    rows = make_rows(batch, ctx, k, matching)

    def call() -> object:
        return [
            propose_ngram(s.prompt_token_ids + s.output_token_ids, k, MIN_N, MAX_N) for s in rows
        ]

    return _median_step(rows, matching, reps, call)


def index_step_seconds(
    batch: int, k: int, ctx: int = 1024, matching: bool = False, reps: int = 7
) -> tuple[float, float]:
    """(median seconds of one NgramProposer step over `batch` rows once their indexes exist,
    seconds of the first call that builds them all)."""
    rows = make_rows(batch, ctx, k, matching)
    config = SpeculativeConfig(
        "ngram", num_speculative_tokens=k, prompt_lookup_min=MIN_N, prompt_lookup_max=MAX_N
    )
    proposer = NgramProposer(config)
    start = time.perf_counter()
    proposer.propose(rows)
    build = time.perf_counter() - start
    return _median_step(rows, matching, reps, lambda: proposer.propose(rows)), build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    table, data = [], {}
    for matching in (False, True):
        case = "match" if matching else "no match"
        for b in batches:
            scan = scan_step_seconds(b, args.k, args.ctx, matching, args.reps)
            index, build = index_step_seconds(b, args.k, args.ctx, matching, args.reps)
            table.append(
                [case, b, f"{scan * 1e3:.3f}", f"{index * 1e3:.3f}", f"{scan / index:.0f}x"]
                + [f"{build * 1e3:.1f}"]
            )
            data[f"{case} b{b}"] = {"scan_s": scan, "index_s": index, "build_s": build}
    print_table(
        f"n-gram proposer host ms per step (median of {args.reps}), {args.ctx}-token contexts, "
        f"k={args.k}, n in [{MIN_N}, {MAX_N}]",
        ["context", "batch", "scan", "index", "scan/index", "index first call (build)"],
        table,
    )
    write_json("ngram_cost", {"ctx": args.ctx, "k": args.k, "rows": data})


if __name__ == "__main__":
    main()
