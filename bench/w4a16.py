"""Weight-only kernels on the GPU host: `python bench/w4a16.py [--sweep] [--quick]`.

At Llama-3-8B's projection shapes ([N, K] = qkv [6144, 4096], o [4096, 4096], gate_up
[28672, 4096], down [4096, 14336]), bf16 activations, group 128 (and 32, GGUF's), prints:
  (a) decode, M = 1 (and M = 4, 16): the W4A16 GEMV's GB/s counted in the bytes it must read
      (packed weights + scales + mins), next to the copy bandwidth of a torch copy of the same
      number of bytes measured in the same run (counted read + write, 2x the bytes), and the
      bf16 F.linear of the same shape with its own GB/s; the 4-bit speed-up over bf16;
      the same for W8A16 (int8 + scales);
  (b) prefill GEMM, M = 4096: TFLOP/s of W4A16 next to a bf16 torch.mm of the same shape.
`--sweep` also times configs of both kernels for M = 1 (the GEMV of engine.kernels.w4a16_gemv,
its GEMV_SWEEP, and a grid of the tiled kernel's decode tiles) and the GEMV's configs for M = 4,
group 128, and reports which kernel/config won per shape next to the default (JSON: w4_best,
w4_best_kernel, w4_runs with every timed config). Kernels are compiled for every config first
on a small matrix of the same specialisation, and the sweep stops timing new configs once
--budget-s seconds have passed (it says which it skipped), so a GPU-host step stays bounded.
Timings: triton.testing.do_bench (median; it clears the L2 cache before every run, so the
weights, 8-235 MB, come from HBM). Each result is checked against the torch reference first.
Writes $OUT/w4a16.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_name, print_table, write_json  # noqa: E402
from engine.kernels.w4a16 import (  # noqa: E402
    W4A16Config,
    choose_config,
    pack_int4,
    w4a16_linear,
    w4a16_linear_ref,
)
from engine.kernels.w4a16_gemv import (  # noqa: E402
    GEMV_MAX_M,
    GEMV_SWEEP,
    GemvConfig,
    choose_gemv_config,
)
from engine.kernels.w8a16 import w8a16_linear, w8a16_linear_ref  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DTYPE = torch.bfloat16
DEVICE = "cuda"
PREFILL_M = 4096
Config = W4A16Config | GemvConfig | None


def _bench(fn: Callable[[], object], rep_ms: int = 100) -> float:
    """Median milliseconds, L2 cleared before each run."""
    import triton.testing  # type: ignore[import-untyped]

    return float(triton.testing.do_bench(fn, warmup=rep_ms // 4, rep=rep_ms, return_mode="median"))


def resolved(config: Config, m: int, n: int, k: int, group: int) -> tuple[str, tuple[int, ...]]:
    """(kernel name, config) that `w4a16_linear` runs for `config` (None: the dispatch's)."""
    device = torch.device(DEVICE)
    if isinstance(config, GemvConfig) or (config is None and m <= GEMV_MAX_M):
        return "gemv", tuple(config or choose_gemv_config(m, n, k, group, device))
    return "tiled", tuple(config or choose_config(m, n, k, device))


def copy_gbs(nbytes: int) -> float:
    """A device copy of `nbytes`, counted as bytes read + written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / _bench(lambda: dst.copy_(src)) / 1e6


def int4_weights(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(n + k)
    q = torch.randint(0, 16, (n, k), generator=gen, device=DEVICE)
    scales = (torch.rand(n, k // group, generator=gen, device=DEVICE) * 0.02).to(DTYPE)
    return pack_int4(q), scales, (-8 * scales.float()).to(DTYPE)


def int8_weights(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(n * k)
    q = torch.randint(-128, 128, (n, k), generator=gen, device=DEVICE).to(torch.int8)
    return q, (torch.rand(n, k // group, generator=gen, device=DEVICE) * 0.002).to(DTYPE)


def _check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2 * scale, rtol=2e-2, msg=what)


def time_configs(
    args: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    group: int,
    configs: list[Config],
    deadline: float,
) -> list[dict[str, Any]]:
    """{kernel, config, ms} of every config that runs (the first always; later ones until
    `deadline`, time.monotonic()); a config that does not fit (registers, shared memory) is
    skipped with a note."""
    x, qweight, scales, mins = args
    m, k, n = x.shape[0], x.shape[1], qweight.shape[0]
    runs: list[dict[str, Any]] = []
    skipped = 0
    for i, config in enumerate(configs):
        if i and time.monotonic() > deadline:
            skipped += 1
            continue
        try:
            fn = functools.partial(w4a16_linear, x, qweight, scales, mins, group, config)
            ms = _bench(fn, rep_ms=100 if i == 0 else 40)
        except Exception as exc:
            print(f"  {config}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        kernel, tiles = resolved(config, m, n, k, group)
        runs.append(dict(kernel=kernel, config=tiles, ms=ms))
    if skipped:
        print(f"  M={m} N={n} K={k}: budget spent, {skipped} of {len(configs)} configs not timed")
    return runs


def bench_decode(
    name: str, m: int, group: int, configs: list[Config], deadline: float = float("inf")
) -> dict:
    """One shape at M rows: W4A16 (every config given, the default first), W8A16 and bf16,
    each with its GB/s."""
    n, k = SHAPES[name]
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    qweight, scales, mins = int4_weights(n, k, group)
    _check(
        w4a16_linear(x, qweight, scales, mins, group),
        w4a16_linear_ref(x, qweight, scales, mins, group),
        f"w4 {name}",
    )
    for config in configs[1:2]:  # one of each other kind checked too: a sweep times no garbage
        _check(
            w4a16_linear(x, qweight, scales, mins, group, config),
            w4a16_linear_ref(x, qweight, scales, mins, group),
            f"w4 {name} {config}",
        )
    bytes4 = sum(t.numel() * t.element_size() for t in (qweight, scales, mins))
    runs = time_configs((x, qweight, scales, mins), group, configs, deadline)
    for run in runs:
        run["gbs"] = bytes4 / run["ms"] / 1e6
    best = min(runs, key=lambda r: r["ms"])
    q8, s8 = int8_weights(n, k, group)
    _check(w8a16_linear(x, q8, s8, group), w8a16_linear_ref(x, q8, s8, group), f"w8 {name}")
    bytes8 = q8.numel() + s8.numel() * s8.element_size()
    ms8 = _bench(lambda: w8a16_linear(x, q8, s8, group))
    weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE)
    ms16 = _bench(lambda: F.linear(x, weight))
    copy = copy_gbs(bytes4)
    return dict(
        shape=name, m=m, n=n, k=k, group=group, bytes_w4=bytes4, copy_gbs=copy,
        w4_default=runs[0], w4_best=best, w4_fraction_of_copy=runs[0]["gbs"] / copy,
        w8_ms=ms8, w8_gbs=bytes8 / ms8 / 1e6, bf16_ms=ms16, bf16_gbs=2 * n * k / ms16 / 1e6,
        w4_speedup_over_bf16=ms16 / runs[0]["ms"],
        w4_kernel=runs[0]["kernel"], w4_best_kernel=best["kernel"],
        w4_best_fraction_of_copy=best["gbs"] / copy, w4_runs=runs if len(runs) > 1 else [],
    )  # fmt: skip


def bench_prefill(name: str, group: int) -> dict:
    n, k = SHAPES[name]
    x = torch.randn(PREFILL_M, k, device=DEVICE, dtype=DTYPE)
    qweight, scales, mins = int4_weights(n, k, group)
    out = w4a16_linear(x, qweight, scales, mins, group)
    _check(out[:64], w4a16_linear_ref(x[:64], qweight, scales, mins, group), f"gemm {name}")
    weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE)
    ms4 = _bench(lambda: w4a16_linear(x, qweight, scales, mins, group))
    ms16 = _bench(lambda: torch.mm(x, weight.t()))
    flops = 2 * PREFILL_M * n * k
    return dict(
        shape=name, m=PREFILL_M, n=n, k=k, group=group, w4_ms=ms4, bf16_ms=ms16,
        w4_tflops=flops / ms4 / 1e9, bf16_tflops=flops / ms16 / 1e9, w4_over_bf16=ms16 / ms4,
    )  # fmt: skip


def sweep_configs(m: int) -> list[Config]:
    """None (the dispatch's choice) first, then the GEMV's GEMV_SWEEP (its first entry is the
    one `bench_decode` also checks against the reference), then, for M = 1, a grid of the
    tiled kernel's decode tiles."""
    grid: list[Config] = [None, *GEMV_SWEEP]
    if m == 1:
        for bn, bk, split, warps in itertools.product((16, 32, 64), (128, 256), (1, 4), (4, 8)):
            grid.append(W4A16Config(1, bn, bk, split, warps, 4))
    return grid


def warm_up(configs: list[Config], deadline: float) -> None:
    """Compile every config (both bit widths share nothing, so 4-bit only, group 128) on a
    small matrix with the sweep's specialisation (N, K multiples of 16), before any timing."""
    x = torch.randn(1, 4096, device=DEVICE, dtype=DTYPE)
    weights = int4_weights(64, 4096, 128)
    for config in configs:
        if time.monotonic() > deadline:
            print("  warm-up: budget spent; later configs compile while timed")
            return
        try:
            w4a16_linear(x, *weights, 128, config)
        except Exception as exc:
            print(f"  warm-up {config}: {type(exc).__name__}")
    torch.cuda.synchronize()


def print_sweep(decode: list[dict[str, Any]]) -> None:
    """Per swept shape: the default and the three fastest configs, kernel named."""
    for r in decode:
        if not r["w4_runs"]:
            continue
        top = sorted(r["w4_runs"], key=lambda run: run["ms"])[:3]
        ranked = ", ".join(f"{t['kernel']}{t['config']} {t['gbs']:.0f}" for t in top)
        print(
            f"  {r['shape']} M={r['m']} G={r['group']}: default {r['w4_kernel']}"
            f"{r['w4_default']['config']} {r['w4_default']['gbs']:.0f} GB/s; best {ranked}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="time configs of both kernels")
    parser.add_argument("--quick", action="store_true", help="M = 1, group 128, no prefill")
    parser.add_argument("--budget-s", type=float, default=240.0, help="sweep time limit")
    args = parser.parse_args()
    print(f"device: {gpu_name()}; copy of 1 GiB: {copy_gbs(2**30):.0f} GB/s")
    deadline = time.monotonic() + args.budget_s
    if args.sweep:
        warm_up(sweep_configs(1), deadline - args.budget_s / 2)
    decode: list[dict[str, Any]] = []
    cases = [(1, 128)] if args.quick else [(1, 128), (1, 32), (4, 128), (16, 128)]
    for m, group in cases:
        for name in SHAPES:
            sweep = args.sweep and m in (1, 4) and group == 128
            configs: list[Config] = sweep_configs(m) if sweep else [None]
            decode.append(bench_decode(name, m, group, configs, deadline))
    print_table(
        "decode: W4A16 GB/s (packed weights + scales + mins) vs a copy of the same bytes",
        ["shape", "M", "G", "MB", "copy", "kernel", "w4", "w4/copy", "best", "best kernel", "w8",
         "bf16", "w4 x bf16"],
        [
            [r["shape"], r["m"], r["group"], f"{r['bytes_w4'] / 1e6:.1f}", f"{r['copy_gbs']:.0f}",
             r["w4_kernel"], f"{r['w4_default']['gbs']:.0f}", f"{r['w4_fraction_of_copy']:.2f}",
             f"{r['w4_best']['gbs']:.0f}", f"{r['w4_best_kernel']}{r['w4_best']['config']}",
             f"{r['w8_gbs']:.0f}", f"{r['bf16_gbs']:.0f}", f"{r['w4_speedup_over_bf16']:.2f}"]
            for r in decode
        ],
    )  # fmt: skip
    if args.sweep:
        print_sweep(decode)
    prefill = [] if args.quick else [bench_prefill(name, 128) for name in SHAPES]
    if prefill:
        print_table(
            f"prefill GEMM, M = {PREFILL_M}: W4A16 vs bf16 torch.mm (TFLOP/s)",
            ["shape", "w4 ms", "bf16 ms", "w4 TF/s", "bf16 TF/s", "w4 / bf16 speed"],
            [
                [r["shape"], f"{r['w4_ms']:.3f}", f"{r['bf16_ms']:.3f}", f"{r['w4_tflops']:.0f}",
                 f"{r['bf16_tflops']:.0f}", f"{r['w4_over_bf16']:.2f}"]
                for r in prefill
            ],
        )  # fmt: skip
    write_json("w4a16", dict(device=gpu_name(), decode=decode, prefill=prefill))


if __name__ == "__main__":
    main()
