"""Structured-output cost: decode tokens/s with and without a JSON schema, same lengths.

    python bench/structured.py                     # GPU: Llama-3-8B shape, dummy bf16 weights
    python bench/structured.py --device cpu --tiny # CPU smoke run (< 60 s)

For each batch size (default 1 and 64) it times decode steps of `batch` requests at context
~`--ctx`, first free (greedy, ignore_eos), then every row under a JSON schema, and prints the
median step time, tokens/s, their ratio, and the grammar mask's share of the step: the host
time of the bitmask fill (each matcher catching up and filling its row, measured by the
sampler's `grammar_mask.fill_seconds`) over the step time. The device-side apply is inside the
step time, not in the fill.

Dummy-weight models have no tokenizer, so the grammar compiler gets an explicit vocabulary:
the real SmolLM2 tokenizer's pieces (the `demo` extra; fully synthetic pieces without it),
truncated or padded with synthetic byte tokens (1-4 random printable bytes) to the model's
vocabulary size (128256 for Llama-3-8B); the EOS id is the model's. `--schema string`
holds one string of minLength 100000, `--schema records` an array of at least 100000 small
records (keys, integers, numbers, enums, short strings): no row can finish the grammar inside
the run, so schema and free rows produce the same number of tokens and every step's mask comes
from a live matcher. Results also go to $OUT/structured-<schema>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_name, print_table, sync, write_json  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.sampling_params import StructuredOutput  # noqa: E402

SCHEMAS = {
    # one long string: the matcher sits in a string state (xgrammar's common hot state)
    "string": {
        "type": "object",
        "properties": {"text": {"type": "string", "minLength": 100000}},
        "required": ["text"],
    },
    # an endless array of small records: keys, integers, numbers, enums and short strings, so
    # the masks come from structural states too
    "records": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 100000,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "name": {"type": "string", "pattern": "^[a-z ]{1,12}$"},
                        "kind": {"enum": ["alpha", "beta", "gamma"]},
                        "score": {"type": "number"},
                    },
                    "required": ["id", "name", "kind", "score"],
                },
            }
        },
        "required": ["items"],
    },
}


def grammar_vocab(
    vocab_size: int, eos_ids: tuple[int, ...], tokenizer_dir: str | None
) -> tuple[list[bytes], str]:
    """The explicit vocabulary and a sentence saying where it came from."""
    try:
        import xgrammar as xgr

        from engine.demo_model import resolve_model_path
        from engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir or resolve_model_path("demo"))
        pieces = list(xgr.TokenizerInfo.from_huggingface(tokenizer).decoded_vocab)[:vocab_size]
        source = f"{len(pieces)} SmolLM2 tokenizer pieces"
    except Exception as exc:  # the demo extra is optional
        pieces, source = [], f"no SmolLM2 tokenizer ({type(exc).__name__})"
    rng = random.Random(0)
    num_real = len(pieces)
    while len(pieces) < vocab_size:
        pieces.append(bytes(rng.randint(32, 126) for _ in range(rng.randint(1, 4))))
    for eos in eos_ids:
        if eos < vocab_size:
            pieces[eos] = b"<|eos|>"
    return pieces, f"{source} + {vocab_size - num_real} synthetic byte tokens = {vocab_size}"


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def decode_steps(
    llm: LLM, batch: int, ctx: int, steps: int, structured: StructuredOutput | None
) -> tuple[float, float]:
    """(median step seconds, mask-fill seconds per step) of `steps` decode steps of `batch`
    requests, after every request has its first token and 3 warm-up steps."""
    engine = llm.engine
    params = SamplingParams(
        temperature=0.0, max_tokens=steps + 64, ignore_eos=True, structured=structured
    )
    ids = [f"{'s' if structured else 'f'}{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, random_prompts(batch, ctx, engine.vocab_size, batch)):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < batch:  # prefilled, grammar compiled, first token out
        for out in engine.step():
            if out.finished:
                raise RuntimeError(f"{out.request_id} ended early: {out.finish_reason} {out.error}")
            started.add(out.request_id)
    for _ in range(3):
        engine.step()
    mask = engine.runner.sampler.grammar_mask
    fill_before = mask.fill_seconds
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - start)
    fill = (mask.fill_seconds - fill_before) / steps
    engine.abort(ids)
    return statistics.median(times), fill


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (CPU smoke run)")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument(
        "--ctx", type=int, default=None, help="prompt tokens (default 1024; 32 tiny)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 32; 8 tiny)")
    parser.add_argument(
        "--tokenizer", default=None, help="a tokenizer directory (default: the demo model's)"
    )
    parser.add_argument("--schema", default="string", choices=sorted(SCHEMAS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: use --device cpu --tiny for a smoke run")
    preset = "tiny" if args.tiny else "llama-3-8b"
    ctx = args.ctx or (32 if args.tiny else 1024)
    steps = args.steps or (8 if args.tiny else 32)
    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(
        f"preset:{preset}",
        load_format="dummy",
        device=args.device,
        dtype="float32" if args.device == "cpu" else "bfloat16",
        show_progress=False,
        max_num_seqs=max(batches),
        max_num_batched_tokens=max(8192, ctx),
        max_model_len=ctx + steps + 128,
    )
    cfg = llm.engine.model_config
    vocab, source = grammar_vocab(cfg.vocab_size, cfg.eos_token_ids, args.tokenizer)
    llm.engine.use_grammar_vocab(vocab)
    structured = StructuredOutput("json_schema", json.dumps(SCHEMAS[args.schema]))
    print(
        f"{gpu_name() if args.device == 'cuda' else 'cpu'}: preset {preset}, dummy weights, "
        f"context {ctx}, {steps} timed steps, schema {args.schema!r}\ngrammar vocabulary: {source}"
    )
    rows, result = [], {"device": gpu_name(), "preset": preset, "vocab": source}
    result["schema"] = args.schema
    for warm in (None, structured):  # first steps, the grammar's compile, Triton's JIT
        decode_steps(llm, min(batches), ctx, 4, warm)
    for b in batches:
        free_s, _ = decode_steps(llm, b, ctx, steps, None)
        json_s, fill_s = decode_steps(llm, b, ctx, steps, structured)
        rows.append(
            [
                b,
                f"{free_s * 1e3:.2f}",
                f"{json_s * 1e3:.2f}",
                f"{b / free_s:.0f}",
                f"{b / json_s:.0f}",
                f"{free_s / json_s:.2f}",
                f"{fill_s * 1e3:.3f}",
                f"{fill_s / json_s:.1%}",
            ]
        )
        result[f"b{b}"] = {"free_step_s": free_s, "json_step_s": json_s, "fill_s": fill_s}
    print_table(
        "decode with and without a JSON schema (same lengths: ignore_eos, an unfinishable string)",
        [
            "batch",
            "free ms",
            "json ms",
            "free tok/s",
            "json tok/s",
            "json/free",
            "fill ms",
            "fill share",
        ],
        rows,
    )
    write_json(f"structured-{args.schema}", result)
    llm.close()


if __name__ == "__main__":
    main()
