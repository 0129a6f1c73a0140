"""Attention micro-benchmark for the GPU host: `python bench/attention.py [--sweep]`.

Prints, next to their limits measured in the same run:
  (a) device copy bandwidth (device-to-device copy, bytes read + written);
  (b) paged decode attention (batch 32, context 4k, block 16, 32 q / 8 KV heads, head_dim 128,
      bf16): GB/s of K/V + q/out moved and the fraction of the copy bandwidth;
  (c) causal prefill of one sequence of 4k / 8k / 16k tokens (32 q / 8 KV heads, head_dim 128,
      bf16): our extend kernel over the paged cache vs torch SDPA with the flash backend forced,
      in TFLOP/s (causal FLOPs = 2*2*S*S*H*D/2), next to the bf16 matmul peak (8192^3).
`--sweep` also times alternative tile configs / split counts and reports the best.
Writes $OUT/attention.json when OUT is set. Timings: triton.testing.do_bench, median.

`--fp8-kv` instead measures the FP8 KV cache (issue 18): paged decode attention at Llama-3-8B
shape (32 q / 8 KV heads, head_dim 128, block 16), batch 64, context 2k, bf16 queries over a
bf16 cache and over float8_e4m3fn / float8_e5m2 caches (scales 0.05 / 0.5), each in GB/s of
the bytes it actually reads (K/V at their own element size, plus q and out) and as a fraction
of the copy bandwidth of the same run; writes $OUT/attention_fp8_kv.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.utils.math import cdiv  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
DECODE_BATCH, DECODE_CONTEXT = 32, 4096
PREFILL_LENGTHS = (4096, 8192, 16384)
DTYPE = torch.bfloat16
DEVICE = "cuda"


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds."""
    import triton.testing  # type: ignore[import-untyped]

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.randn(512 * 2**20, device=DEVICE, dtype=DTYPE)  # 1 GiB
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_peak_tflops() -> float:
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    ms = _bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def paged_cache(num_tokens_per_seq: list[int], gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random K/V caches and a block table of shuffled block ids (block 0 unused)."""
    blocks_per_seq = [cdiv(n, BLOCK) for n in num_tokens_per_seq]
    num_blocks = sum(blocks_per_seq) + 1
    ids = torch.randperm(num_blocks - 1, generator=gen, device=DEVICE) + 1
    table = torch.zeros(len(blocks_per_seq), max(blocks_per_seq), dtype=torch.int32, device=DEVICE)
    start = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = ids[start : start + n].int()
        start += n
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE)
    return k_cache, v_cache, table


def bench_decode(copy_gbs: float, sweep: bool) -> dict[str, Any]:
    from engine.kernels.paged_decode_attention import (
        choose_num_splits,
        num_sms,
        paged_decode_attention,
        paged_decode_attention_ref,
    )

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    k_cache, v_cache, table = paged_cache([DECODE_CONTEXT] * DECODE_BATCH, gen)
    seq_lens = torch.full((DECODE_BATCH,), DECODE_CONTEXT, dtype=torch.int32, device=DEVICE)
    query = torch.randn(DECODE_BATCH, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    scale = HEAD_DIM**-0.5
    args = (query, k_cache, v_cache, table, seq_lens, scale)
    ref = paged_decode_attention_ref(query.float(), k_cache.float(), v_cache.float(), *args[3:])
    torch.testing.assert_close(
        paged_decode_attention(*args, DECODE_CONTEXT).float(), ref, atol=2e-2, rtol=2e-2
    )
    kv_bytes = 2 * DECODE_BATCH * DECODE_CONTEXT * KV_HEADS * HEAD_DIM * DTYPE.itemsize
    moved = kv_bytes + 2 * query.numel() * DTYPE.itemsize
    splits = choose_num_splits(DECODE_BATCH, KV_HEADS, DECODE_CONTEXT, num_sms(query.device))
    configs: list[dict[str, Any]] = [dict(num_splits=splits)]  # the launcher's own choice
    if sweep:
        configs += [
            dict(num_splits=s, block_n=n, num_stages=st)
            for s in (1, 2, 3, 4, 8)
            for n in (32, 64, 128)
            for st in (2, 3, 4)
        ]
    results: list[dict[str, Any]] = []
    for knobs in configs:
        try:
            ms = _bench(lambda knobs=knobs: paged_decode_attention(*args, DECODE_CONTEXT, **knobs))
        except Exception as exc:  # a config that does not fit (shared memory) is skipped
            print(f"  decode {knobs}: skipped ({type(exc).__name__})")
            continue
        gbs = moved / ms / 1e6
        results.append(dict(knobs=knobs, ms=ms, gbs=gbs, fraction_of_copy=gbs / copy_gbs))
    best = max(results, key=lambda r: r["gbs"])
    return dict(default=results[0], best=best, bytes_moved=moved)


FP8_BATCH, FP8_CONTEXT = 64, 2048
FP8_SCALES = (0.05, 0.5)


def bench_decode_kv(kv_dtype: torch.dtype, copy_gbs: float, sweep: bool) -> dict[str, Any]:
    """Paged decode at batch FP8_BATCH x FP8_CONTEXT over a `kv_dtype` cache (bf16 queries)."""
    from engine.attention.torch_backend import quantize_kv
    from engine.kernels.paged_decode_attention import (
        choose_num_splits,
        num_sms,
        paged_decode_attention,
        paged_decode_attention_ref,
    )

    gen = torch.Generator(device=DEVICE).manual_seed(1)
    k_cache, v_cache, table = paged_cache([FP8_CONTEXT] * FP8_BATCH, gen)
    k_scale, v_scale = FP8_SCALES if kv_dtype != DTYPE else (1.0, 1.0)
    k_cache = quantize_kv(k_cache * 10, kv_dtype, k_scale)  # keys of magnitude ~10
    v_cache = quantize_kv(v_cache, kv_dtype, v_scale)
    seq_lens = torch.full((FP8_BATCH,), FP8_CONTEXT, dtype=torch.int32, device=DEVICE)
    query = torch.randn(FP8_BATCH, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    args = (query, k_cache, v_cache, table, seq_lens, HEAD_DIM**-0.5)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    ref = paged_decode_attention_ref(query.float(), *args[1:], k_scale, v_scale)
    out = paged_decode_attention(*args, FP8_CONTEXT, **scales)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    kv_bytes = 2 * FP8_BATCH * FP8_CONTEXT * KV_HEADS * HEAD_DIM * k_cache.element_size()
    moved = kv_bytes + 2 * query.numel() * DTYPE.itemsize
    splits = choose_num_splits(FP8_BATCH, KV_HEADS, FP8_CONTEXT, num_sms(query.device))
    configs: list[dict[str, Any]] = [dict(num_splits=splits)]
    if sweep:
        configs += [
            dict(num_splits=s, block_n=n, num_stages=st, num_warps=w)
            for s in (1, 2, 4)
            for n in (32, 64, 128)
            for st in (2, 3, 4)
            for w in (4, 8)
        ]
    results: list[dict[str, Any]] = []
    for knobs in configs:
        try:
            ms = _bench(
                lambda knobs=knobs: paged_decode_attention(*args, FP8_CONTEXT, **scales, **knobs)
            )
        except Exception as exc:
            print(f"  decode {kv_dtype} {knobs}: skipped ({type(exc).__name__})")
            continue
        gbs = moved / ms / 1e6
        results.append(dict(knobs=knobs, ms=ms, gbs=gbs, fraction_of_copy=gbs / copy_gbs))
    best = max(results, key=lambda r: r["gbs"])
    return dict(kv_dtype=str(kv_dtype), default=results[0], best=best, bytes_read=moved)


def run_fp8_kv(sweep: bool) -> None:
    """`--fp8-kv`: copy bandwidth, then decode over bf16 / e4m3 / e5m2 caches in the same run."""
    import triton  # type: ignore[import-untyped]

    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    rows = [bench_decode_kv(d, copy_gbs, sweep) for d in (DTYPE, *_FP8_DTYPES)]
    print(f"device: {device}   torch {torch.__version__}   triton {triton.__version__}")
    print(f"device copy bandwidth {copy_gbs:10.1f} GB/s (bytes read + written)")
    print(
        f"paged decode, batch {FP8_BATCH}, context {FP8_CONTEXT}, 32 q / 8 KV heads x 128, bf16 q"
    )
    base_ms = rows[0]["default"]["ms"]
    for r in rows:
        for label in ("default", "best"):
            x = r[label]
            print(
                f"  {r['kv_dtype']:22s} {label:7s} {x['ms'] * 1e3:8.1f} us  {r['bytes_read'] / 2**20:7.1f} MiB"
                f"  {x['gbs']:8.1f} GB/s  {100 * x['fraction_of_copy']:5.1f}% of copy"
                f"  {base_ms / x['ms']:4.2f}x bf16  {x['knobs']}"
            )
    result = dict(device=device, copy_gbs=copy_gbs, batch=FP8_BATCH, context=FP8_CONTEXT, rows=rows)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "attention_fp8_kv.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _sdpa_flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[Callable[[], torch.Tensor], str]:
    """A closure running flash SDPA with GQA (enable_gqa, or K/V pre-expanded if unsupported)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def run_gqa() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    try:
        run_gqa()
        return run_gqa, "enable_gqa"
    except (RuntimeError, TypeError):
        k_full = k.repeat_interleave(HEADS // KV_HEADS, dim=1)
        v_full = v.repeat_interleave(HEADS // KV_HEADS, dim=1)

        def run_expanded() -> torch.Tensor:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return sdpa(q, k_full, v_full, is_causal=True)

        return run_expanded, "repeat_interleave"


def bench_prefill(seq_len: int, sweep: bool) -> dict[str, Any]:
    from engine.kernels.extend_attention import ExtendConfig, default_config, extend_attention

    gen = torch.Generator(device=DEVICE).manual_seed(seq_len)
    k_cache, v_cache, table = paged_cache([seq_len], gen)
    query = torch.randn(seq_len, HEADS, HEAD_DIM, generator=gen, device=DEVICE, dtype=DTYPE)
    qsl = torch.tensor([0, seq_len], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
    scale = HEAD_DIM**-0.5
    # The same K/V, contiguous, for SDPA: [1, heads, S, D].
    k = (
        k_cache[table[0].long()]
        .reshape(-1, KV_HEADS, HEAD_DIM)[:seq_len]
        .transpose(0, 1)[None]
        .contiguous()
    )
    v = (
        v_cache[table[0].long()]
        .reshape(-1, KV_HEADS, HEAD_DIM)[:seq_len]
        .transpose(0, 1)[None]
        .contiguous()
    )
    q = query.transpose(0, 1)[None].contiguous()
    flash, gqa_mode = _sdpa_flash(q, k, v)
    expected = flash()[0].transpose(0, 1)
    ours = lambda config: extend_attention(  # noqa: E731
        query, k_cache, v_cache, table, qsl, seq_lens, scale, seq_len, config
    )
    torch.testing.assert_close(ours(None), expected, atol=2e-2, rtol=2e-2)
    flops = 2 * 2 * seq_len * seq_len * HEADS * HEAD_DIM / 2
    configs = [default_config(HEAD_DIM, seq_len, on_cuda=True, dtype=DTYPE)]
    if sweep:
        configs += [
            ExtendConfig(m, n, w, s)
            for m, n, w, s in [
                (128, 128, 8, 3),
                (128, 64, 8, 4),
                (128, 64, 4, 3),
                (128, 32, 4, 4),
                (64, 128, 4, 3),
                (64, 64, 4, 4),
                (128, 128, 8, 2),
                (128, 64, 8, 2),
            ]
        ]
    results: list[dict[str, Any]] = []
    for config in configs:
        try:
            ms = _bench(lambda config=config: ours(config))
        except Exception as exc:
            print(f"  prefill {config}: skipped ({type(exc).__name__})")
            continue
        results.append(dict(config=config._asdict(), ms=ms, tflops=flops / ms / 1e9))
    flash_ms = _bench(flash)
    best = max(results, key=lambda r: r["tflops"])
    return dict(
        seq_len=seq_len,
        default=results[0],
        best=best,
        sdpa_flash=dict(ms=flash_ms, tflops=flops / flash_ms / 1e9, gqa=gqa_mode),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    parser.add_argument("--fp8-kv", action="store_true", help="decode over FP8 vs bf16 caches")
    cli = parser.parse_args()
    sweep = cli.sweep
    if not torch.cuda.is_available():
        sys.exit(
            "bench/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured."
        )
    if cli.fp8_kv:
        run_fp8_kv(sweep)
        return
    import triton  # type: ignore[import-untyped]

    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    peak = matmul_peak_tflops()
    decode = bench_decode(copy_gbs, sweep)
    prefill = [bench_prefill(n, sweep) for n in PREFILL_LENGTHS]
    print(f"device: {device}   torch {torch.__version__}   triton {triton.__version__}")
    print(f"(a) device copy bandwidth         {copy_gbs:10.1f} GB/s")
    print(f"    bf16 matmul peak (8192^3)      {peak:10.1f} TFLOP/s")
    for label in ("default", "best"):
        r = decode[label]
        print(
            f"(b) paged decode {label:7s} {r['ms'] * 1e3:8.1f} us {r['gbs']:9.1f} GB/s "
            f"{100 * r['fraction_of_copy']:5.1f}% of copy  {r['knobs']}"
        )
    print("(c) causal prefill      ours(default)   ours(best)   SDPA flash   (TFLOP/s)")
    for r in prefill:
        print(
            f"    {r['seq_len']:6d} tokens  {r['default']['tflops']:12.1f} {r['best']['tflops']:12.1f} "
            f"{r['sdpa_flash']['tflops']:12.1f}   best={r['best']['config']}"
        )
    result = dict(
        device=device,
        torch=torch.__version__,
        triton=triton.__version__,
        copy_gbs=copy_gbs,
        matmul_peak_tflops=peak,
        decode=decode,
        prefill=prefill,
    )
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "attention.json"
        path.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
