"""Weight-only kernels on the GPU host: `python bench/w4a16.py [--sweep] [--quick]`.

At Llama-3-8B's projection shapes ([N, K] = qkv [6144, 4096], o [4096, 4096], gate_up
[28672, 4096], down [4096, 14336]), bf16 activations, group 128 (and 32, GGUF's), prints:
  (a) decode, M = 1 (and M = 4, 16): the W4A16 GEMV's GB/s counted in the bytes it must read
      (packed weights + scales + mins), next to the copy bandwidth of a torch copy of the same
      number of bytes measured in the same run (counted read + write, 2x the bytes), and the
      bf16 F.linear of the same shape with its own GB/s; the 4-bit speed-up over bf16;
      the same for W8A16 (int8 + scales);
  (b) prefill GEMM, M = 4096: TFLOP/s of W4A16 next to a bf16 torch.mm of the same shape.
`--sweep` also times tile configs for M = 1 and reports the best next to the default.
Timings: triton.testing.do_bench (median; it clears the L2 cache before every run, so the
weights, 8-235 MB, come from HBM). Each result is checked against the torch reference first.
Writes $OUT/w4a16.json when OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
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
from engine.kernels.w8a16 import w8a16_linear, w8a16_linear_ref  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
DTYPE = torch.bfloat16
DEVICE = "cuda"
PREFILL_M = 4096


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds, L2 cleared before each run."""
    import triton.testing  # type: ignore[import-untyped]

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


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


def bench_decode(name: str, m: int, group: int, configs: list[W4A16Config | None]) -> dict:
    """One shape at M rows: W4A16 (every config given), W8A16 and bf16, each with its GB/s."""
    n, k = SHAPES[name]
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    qweight, scales, mins = int4_weights(n, k, group)
    _check(
        w4a16_linear(x, qweight, scales, mins, group),
        w4a16_linear_ref(x, qweight, scales, mins, group),
        f"w4 {name}",
    )
    bytes4 = sum(t.numel() * t.element_size() for t in (qweight, scales, mins))
    runs: list[dict[str, Any]] = []
    for config in configs:
        try:
            ms = _bench(functools.partial(w4a16_linear, x, qweight, scales, mins, group, config))
        except Exception as exc:  # a config that does not fit (registers, shared memory)
            print(f"  {name} {config}: skipped ({type(exc).__name__})")
            continue
        runs.append(
            dict(config=config or choose_config(m, n, k, x.device), ms=ms, gbs=bytes4 / ms / 1e6)
        )
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


def sweep_configs(m: int) -> list[W4A16Config | None]:
    """None (the launcher's choice) first, then a grid of decode tiles."""
    grid: list[W4A16Config | None] = [None]
    block_ms = (1,) if m == 1 else (16,)
    for bm, bn, bk, split, warps, stages in itertools.product(
        block_ms, (16, 32, 64), (128, 256, 512), (1, 2, 4), (4, 8), (2, 4)
    ):
        grid.append(W4A16Config(bm, bn, bk, split, warps, stages))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="time a grid of M = 1 configs")
    parser.add_argument("--quick", action="store_true", help="M = 1, group 128, no prefill")
    args = parser.parse_args()
    print(f"device: {gpu_name()}; copy of 1 GiB: {copy_gbs(2**30):.0f} GB/s")
    decode: list[dict[str, Any]] = []
    cases = [(1, 128)] if args.quick else [(1, 128), (1, 32), (4, 128), (16, 128)]
    for m, group in cases:
        for name in SHAPES:
            sweep = args.sweep and m == 1 and group == 128
            configs: list[W4A16Config | None] = sweep_configs(m) if sweep else [None]
            decode.append(bench_decode(name, m, group, configs))
    print_table(
        "decode: W4A16 GB/s (packed weights + scales + mins) vs a copy of the same bytes",
        ["shape", "M", "G", "MB", "copy", "w4", "w4/copy", "best", "w8", "bf16", "w4 x bf16"],
        [
            [r["shape"], r["m"], r["group"], f"{r['bytes_w4'] / 1e6:.1f}", f"{r['copy_gbs']:.0f}",
             f"{r['w4_default']['gbs']:.0f}", f"{r['w4_fraction_of_copy']:.2f}",
             f"{r['w4_best']['gbs']:.0f}", f"{r['w8_gbs']:.0f}", f"{r['bf16_gbs']:.0f}",
             f"{r['w4_speedup_over_bf16']:.2f}"]
            for r in decode
        ],
    )  # fmt: skip
    if args.sweep:
        for r in decode:
            if r["w4_best"] is not r["w4_default"]:
                print(f"  best {r['shape']} M={r['m']} G={r['group']}: {r['w4_best']}")
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
