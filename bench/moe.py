"""The fused MoE kernel on the GPU host: `python bench/moe.py [--sweep] [--quick]`.

Two layer shapes in bf16: Qwen3-30B-A3B (128 experts, top-8, hidden 2048, expert FFN 768) and
Mixtral-8x7B (8 experts, top-2, hidden 4096, FFN 14336), at batch 1, 16, 64 and 256 tokens
routed by softmax over random router logits. For each it prints:
  - the fused Triton kernel (engine.kernels.fused_moe: sort + two grouped GEMMs + the sum),
    replayed from a CUDA graph as the engine's decode steps run it ("fused"), and eager
    ("eager": ~12 launches, whose CPU cost dominates at batch 1);
  - the loop over experts (engine.layers.moe.fused_experts_ref, cuBLAS per expert; it syncs
    with the host once per call to read the expert counts);
  - the roofline: the bytes the step must move (the weights of every expert that received a
    token, plus x and the output) at the copy bandwidth measured in the same run (a torch
    copy, counted read + write), and the graph-replayed kernel's fraction of it (1.0 = at
    the roofline);
  - the fused kernel's TFLOP/s (2 * T * k * 3 * H * I).
`--sweep` also times a grid of tile configs per case and prints the best next to the default.
`--quick`: batch 1 and 64 only. Timings: triton.testing.do_bench (median; L2 cleared before each
run, so the weights come from HBM). Each result is checked against the torch reference first.
Writes $OUT/moe.json when OUT is set.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import gpu_name, print_table, write_json  # noqa: E402
from engine.kernels.fused_moe import MoETiles, choose_tiles, fused_moe  # noqa: E402
from engine.layers.moe import fused_experts_ref, route  # noqa: E402

# name -> (experts, top-k, hidden, expert FFN)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336)}
BATCHES = (1, 16, 64, 256)
DTYPE = torch.bfloat16
DEVICE = "cuda"


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds, L2 cleared before each run."""
    import triton.testing  # type: ignore[import-untyped]

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_gbs(nbytes: int) -> float:
    """A device copy of `nbytes`, counted as bytes read + written (GB/s)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * nbytes / _bench(lambda: dst.copy_(src)) / 1e6


def layer_weights(shape: str) -> tuple[torch.Tensor, torch.Tensor]:
    experts, _, hidden, inter = SHAPES[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    w13 = torch.empty(experts, 2 * inter, hidden, device=DEVICE, dtype=DTYPE)
    w2 = torch.empty(experts, hidden, inter, device=DEVICE, dtype=DTYPE)
    return w13.normal_(std=hidden**-0.5, generator=gen), w2.normal_(std=inter**-0.5, generator=gen)


def routed_batch(shape: str, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    experts, top_k, hidden, _ = SHAPES[shape]
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, device=DEVICE, generator=gen).to(DTYPE)
    logits = torch.randn(num_tokens, experts, device=DEVICE, generator=gen)
    weights, ids = route(logits, top_k, renormalize=True)
    return x, weights, ids


def active_bytes(shape: str, ids: torch.Tensor) -> int:
    """Weights of the experts that received a token, plus x read and the output written."""
    _, _, hidden, inter = SHAPES[shape]
    active = int(torch.unique(ids).numel())
    return (active * 3 * hidden * inter + 2 * ids.shape[0] * hidden) * DTYPE.itemsize


def sweep_tiles() -> list[MoETiles]:
    return [
        MoETiles(bm, bn, bk, warps, stages)
        for bm, bn, bk, warps, stages in itertools.product(
            (16, 32, 64), (32, 64, 128), (64, 128), (4, 8), (3,)
        )
    ]


MoEArgs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def graph_ms(args: MoEArgs, tiles: MoETiles | None = None) -> float:
    """Median ms of fused_moe(*args) replayed from a CUDA graph (compiled before the capture)."""
    fused_moe(*args, tiles=tiles)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(*args, tiles=tiles)
    return _bench(graph.replay)


def _best_tiles(args: MoEArgs, tiles: list[MoETiles]) -> tuple[MoETiles, float]:
    best: tuple[MoETiles, float] | None = None
    for t in tiles:
        try:
            ms = graph_ms(args, t)
        except Exception as exc:  # a config that does not fit (registers, shared memory)
            print(f"  {t}: skipped ({type(exc).__name__})")
            continue
        if best is None or ms < best[1]:
            best = (t, ms)
    assert best is not None, "no tile config ran"
    return best


def bench_case(shape: str, num_tokens: int, weights: tuple, copy: float, sweep: bool) -> dict:
    experts, top_k, hidden, inter = SHAPES[shape]
    w13, w2 = weights
    x, topk_weights, ids = routed_batch(shape, num_tokens)
    args: MoEArgs = (x, w13, w2, topk_weights, ids)
    out, ref = fused_moe(*args), fused_experts_ref(*args)
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(out.float(), ref.float(), atol=3e-2 * scale, rtol=3e-2)
    fused_ms = graph_ms(args)
    eager_ms = _bench(lambda: fused_moe(*args))
    loop_ms = _bench(lambda: fused_experts_ref(*args))
    nbytes = active_bytes(shape, ids)
    roofline_ms = nbytes / copy / 1e6
    row: dict[str, Any] = dict(
        shape=shape, tokens=num_tokens, active_experts=int(torch.unique(ids).numel()),
        active_mb=nbytes / 1e6,
        tiles=[choose_tiles(num_tokens * top_k, experts, n, x.device) for n in (inter, hidden)],
        fused_ms=fused_ms, eager_ms=eager_ms, loop_ms=loop_ms, roofline_ms=roofline_ms,
        fraction_of_roofline=roofline_ms / fused_ms, speedup_over_loop=loop_ms / fused_ms,
        fused_tflops=2 * num_tokens * top_k * 3 * hidden * inter / fused_ms / 1e9,
    )  # fmt: skip
    if sweep:
        tiles, ms = _best_tiles(args, sweep_tiles())
        row |= dict(best_tiles=tiles, best_ms=ms, best_fraction=roofline_ms / ms)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", action="store_true", help="time a grid of tile configs")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 64 only")
    args = parser.parse_args()
    copy = copy_gbs(2**30)
    print(f"device: {gpu_name()}; copy of 1 GiB: {copy:.0f} GB/s (read + write)")
    rows: list[dict[str, Any]] = []
    for shape in SHAPES:
        weights = layer_weights(shape)
        for num_tokens in (1, 64) if args.quick else BATCHES:
            rows.append(bench_case(shape, num_tokens, weights, copy, args.sweep))
            print(f"  {shape} T={num_tokens}: fused {rows[-1]['fused_ms']:.3f} ms", flush=True)
        del weights
        torch.cuda.empty_cache()
    print_table(
        "MoE layer, bf16: fused kernel vs loop over experts vs the active experts' bytes at copy speed",
        ["shape", "T", "experts", "MB", "fused ms", "eager ms", "loop ms", "roofline ms",
         "of roofline",
         "x loop", "TF/s"],
        [
            [r["shape"], r["tokens"], r["active_experts"], f"{r['active_mb']:.1f}",
             f"{r['fused_ms']:.3f}", f"{r['eager_ms']:.3f}", f"{r['loop_ms']:.3f}", f"{r['roofline_ms']:.3f}",
             f"{r['fraction_of_roofline']:.2f}", f"{r['speedup_over_loop']:.1f}",
             f"{r['fused_tflops']:.0f}"]
            for r in rows
        ],
    )  # fmt: skip
    for r in rows:
        if args.sweep:
            print(f"  best {r['shape']} T={r['tokens']}: {r['best_tiles']} "
                  f"{r['best_ms']:.3f} ms ({r['best_fraction']:.2f} of roofline; "
                  f"default {r['tiles']})")  # fmt: skip
    write_json("moe", dict(device=gpu_name(), copy_gbs=copy, rows=rows))


if __name__ == "__main__":
    main()
