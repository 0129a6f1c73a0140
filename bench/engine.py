"""Engine benchmark on one GPU: Llama-3-8B shape, dummy bf16 weights, against measured limits.

    python bench/engine.py [--quick] [--quantization fp8|int4] [--batches 1,8] [--skip-offline]

Prints, each next to its limit measured in the same run (device copy bandwidth, bf16 matmul
peak) and next to Hugging Face transformers where a peer exists:
  * decode step time at batch 1, 8, 32, 128, 256 (context ~1k) vs the HBM roofline;
  * offline throughput, 1024-token prompts and 1024 output tokens, vs the roofline bound;
  * a 4k-token prefill vs the FLOP bound;
  * transformers `generate` vs Tandem at batch 1 and 32 (same prompts, 64 new tokens).
With `--quantization` the linear layers are quantized on load (engine.quant): every roofline
counts the quantized model's own bytes, and the prefill bound its linears at the FP8 peak.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    copy_bandwidth,
    gpu_name,
    matmul_peak,
    median_time,
    print_table,
    sync,
    write_json,
)
from engine import LLM, SamplingParams  # noqa: E402
from engine.demo_model import PRESETS  # noqa: E402
from engine.layers.linear import LinearBase  # noqa: E402
from engine.utils.math import cdiv  # noqa: E402

PRESET = "llama-3-8b"
CTX = 1024


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def weight_bytes(llm: LLM) -> int:
    """Weight bytes a decode step streams: every parameter except the embedding table, of
    which a step reads only its batch's rows (the LM head is streamed whole)."""
    model = llm.engine.runner.model
    embed = model.model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def decode_step_times(llm: LLM, batch: int, steps: int) -> float:
    """Mean wall time of a decode step with `batch` requests at context ~CTX, over `steps`
    steps with one device sync at each end (a sync per step would undo overlap scheduling,
    which keeps a step in flight while the host prepares the next)."""
    engine = llm.engine
    vocab = engine.vocab_size
    # Early requests decode while later ones prefill: leave room for those steps too.
    warmup_steps = cdiv(batch * CTX, engine.config.max_num_batched_tokens) + 8
    params = SamplingParams(temperature=0.0, max_tokens=steps + warmup_steps, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, random_prompts(batch, CTX, vocab, batch)):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    while len(started) < batch:  # every request prefilled and holding its first token
        for out in engine.step():
            if out.finished:
                raise RuntimeError(
                    f"{out.request_id} finished early: {out.finish_reason} after {len(out.token_ids)} tokens"
                )
            started.add(out.request_id)
    for _ in range(2):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    engine.abort(ids)
    while engine.has_unfinished():  # the step still in flight
        engine.step()
    return elapsed / steps


def prefill_time(llm: LLM, length: int) -> float:
    engine = llm.engine
    times = []
    for i in range(4):
        engine.add_request(
            f"p{i}",
            random_prompts(1, length, engine.vocab_size, 100 + i)[0],
            SamplingParams(temperature=0.0, max_tokens=1),
        )
        sync()
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def offline_throughput(llm: LLM, num_requests: int, out_len: int) -> tuple[float, int]:
    prompts = random_prompts(num_requests, CTX, llm.engine.vocab_size, 7)
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed, llm.engine.stats().num_preemptions_total


def hf_peer(batches: list[int], new_tokens: int) -> dict[int, float]:
    """transformers generate tokens/s on the same shape (random weights, bf16, SDPA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{k: v for k, v in PRESETS[PRESET].items() if k not in ("architectures", "torch_dtype")}
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).eval()
    results = {}
    for b in batches:
        ids = torch.tensor(random_prompts(b, CTX, cfg.vocab_size, b), device="cuda")
        kwargs = dict(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            pad_token_id=0,
        )
        model.generate(
            ids[:, :32], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        )  # warm up
        sync()
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        sync()
        results[b] = b * new_tokens / (time.perf_counter() - start)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def tandem_same_as_peer(llm: LLM, batches: list[int], new_tokens: int) -> dict[int, float]:
    results = {}
    for b in batches:
        prompts = random_prompts(b, CTX, llm.engine.vocab_size, b)
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params)
        results[b] = b * new_tokens / (time.perf_counter() - start)
    return results


def fp8_matmul_peak(n: int = 8192) -> float:
    """FP8 GEMM FLOP/s (`torch._scaled_mm`, row-wise scales as engine.quant.fp8 uses them)."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()
    sa, sb = torch.ones(n, 1, device="cuda"), torch.ones(1, n, device="cuda")
    t = median_time(lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16), iters=10)
    return 2 * n**3 / t


def prefill_bound(cfg, length: int, peak: float, linear_peak: float) -> tuple[float, float]:
    """(FLOPs, seconds at the bound) of a `length`-token prefill: the decoder's linears at
    `linear_peak` (the FP8 peak for fp8 weights), attention at the bf16 `peak`. The embedding
    and LM head are left out (a prefill computes logits for its last token only)."""
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    linear = 2 * (cfg.num_params - embed) * length
    attention = cfg.num_layers * 2 * length * length * cfg.num_heads * cfg.head_dim
    return linear + attention, linear / linear_peak + attention / peak


def check_quantized(llm: LLM, quantization: str | None) -> None:
    """Exit unless every linear layer runs the asked method (a bf16 run labelled fp8 would
    report a wrong speedup)."""
    model = llm.engine.runner.model
    methods = {m.method.name for m in model.modules() if isinstance(m, LinearBase)}
    if methods != {quantization or "unquantized"}:
        sys.exit(f"--quantization {quantization}: the model's linear layers run {methods}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer requests and steps")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-offline", action="store_true", help="no offline throughput")
    parser.add_argument("--quantization", choices=["fp8", "int4"], default=None)
    parser.add_argument("--batches", default="1,8,32,128,256", help="decode batch sizes")
    parser.add_argument(
        "--async-scheduling",
        choices=["auto", "on", "off"],
        default="auto",
        help="overlap scheduling (auto: on, CUDA at TP 1)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/engine.py needs a CUDA GPU")
    bw, peak = copy_bandwidth(), matmul_peak()
    linear_peak = fp8_matmul_peak() if args.quantization == "fp8" else peak
    print(
        f"{gpu_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {peak / 1e12:.0f} TFLOP/s"
        + (f", fp8 {linear_peak / 1e12:.0f} TFLOP/s" if args.quantization == "fp8" else "")
    )
    label = args.quantization or "bf16"
    peer_batches, peer_tokens = [1, 32], 64
    peer: dict[int, float] = {}
    if not args.skip_peer:
        try:
            peer = hf_peer(peer_batches, peer_tokens)
        except Exception as exc:  # the peer is optional: report and carry on
            print(f"transformers peer failed: {type(exc).__name__}: {exc}")
    llm = LLM(
        f"preset:{PRESET}",
        load_format="dummy",
        dtype="bfloat16",
        show_progress=False,
        max_num_batched_tokens=8192,
        max_num_seqs=256,
        quantization=args.quantization,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
    )
    check_quantized(llm, args.quantization)
    if not llm.engine.overlap:
        label += "-sync"  # step by step: its own JSON, the overlapped run's peer
    cfg = llm.engine.model_config
    wbytes, kv_tok = weight_bytes(llm), llm.engine.kv_spec.bytes_per_token()
    result: dict = {
        "gpu": gpu_name(),
        "copy_bw": bw,
        "matmul_peak": peak,
        "weight_bytes": wbytes,
        "kv_blocks": llm.engine.runner.num_blocks,
        "quantization": label,
        "async_scheduling": llm.engine.overlap,
    }
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        t = decode_step_times(llm, b, 12 if args.quick else 24)
        # Bytes read once per step over the copy bandwidth (which counts read + write bytes).
        floor = (wbytes + b * (CTX + 8) * kv_tok) / bw
        rows.append([b, f"{t * 1e3:.2f}", f"{floor * 1e3:.2f}", f"{floor / t:.0%}", f"{b / t:.0f}"])
        result[f"decode_b{b}"] = {"step_s": t, "roofline_s": floor}
    print_table(
        f"{label} decode step, context ~1k, overlap scheduling "
        f"{'on' if llm.engine.overlap else 'off'} (roofline = bytes read / copy bandwidth)",
        ["batch", "step ms", "roofline ms", "of roofline", "tok/s"],
        rows,
    )
    t4k = prefill_time(llm, 4096)
    flops, bound_s = prefill_bound(cfg, 4096, peak, linear_peak)
    print_table(
        f"{label} 4k-token prefill",
        ["ms", "FLOP bound ms", "of bound", "TFLOP/s"],
        [
            [
                f"{t4k * 1e3:.1f}",
                f"{bound_s * 1e3:.1f}",
                f"{bound_s / t4k:.0%}",
                f"{flops / t4k / 1e12:.0f}",
            ]
        ],
    )
    result["prefill_4k"] = {"s": t4k, "flops": flops, "bound_s": bound_s}
    if args.skip_offline:
        write_json(f"engine-{label}", result)
        return
    n_req = 256
    out_len = 256 if args.quick else 1024
    tput, preempt = offline_throughput(llm, n_req, out_len)
    seqs = llm.engine.config.max_num_seqs
    avg_ctx = CTX + out_len / 2
    bound_step = (wbytes + seqs * avg_ctx * kv_tok) / bw
    bound = seqs / bound_step
    print_table(
        f"offline {n_req} x ({CTX} in, {out_len} out)",
        ["output tok/s", "bound tok/s", "of bound", "preemptions"],
        [[f"{tput:.0f}", f"{bound:.0f}", f"{tput / bound:.0%}", preempt]],
    )
    result["offline"] = {"tok_s": tput, "bound_tok_s": bound, "requests": n_req, "out_len": out_len}
    ours = tandem_same_as_peer(llm, peer_batches, peer_tokens)
    if peer:
        print_table(
            f"peer: transformers generate ({CTX}-token prompts, {peer_tokens} new tokens)",
            ["batch", "transformers tok/s", "tandem tok/s", "speedup"],
            [
                [b, f"{peer[b]:.0f}", f"{ours[b]:.0f}", f"{ours[b] / peer[b]:.1f}x"]
                for b in peer_batches
            ],
        )
    result["peer"] = {"transformers": peer, "tandem": ours}
    write_json("engine" if label == "bf16" else f"engine-{label}", result)


if __name__ == "__main__":
    main()
