"""All-reduce latency on one host: NCCL versus the engine's one-shot symmetric-memory kernel.

    python bench/allreduce.py [--world 2] [--ops 64]

Two (or `--world`) processes, one GPU each. For each message shape (decode: 1, 8 and 64 rows of
a 4096-wide bf16 hidden state; prefill-sized: 2048 rows) and each method, `--ops` all-reduces
are captured in one CUDA graph (as the engine's decode graphs hold them) and replayed; the
figure is replay time / ops, median of 20 replays on rank 0. Next to it: the time the bytes
alone need at the NVLink bandwidth NCCL reaches on the largest message in the same run.
Writes $OUT/allreduce.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN = 4096
ROWS = (1, 8, 64, 2048)


def _time_graph(fn, x: torch.Tensor, ops: int) -> float:
    """Median ms per op of `ops` calls of fn(x) captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)  # warm-up outside the graph (NCCL lazily builds its channels)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ops):
            fn(x)
    times = []
    for _ in range(20):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / ops)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, ops: int, out_path: str) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, device_id=device
    )
    from engine.distributed.fast_allreduce import SymmMemAllReduce

    fast = SymmMemAllReduce(dist.group.WORLD, device, max_bytes=1 << 20)  # type: ignore[arg-type]

    def nccl(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    results = []
    for rows in ROWS:
        x = torch.full((rows, HIDDEN), 1.0 / world, dtype=torch.bfloat16, device=device)
        row = {
            "rows": rows,
            "bytes": x.numel() * x.element_size(),
            "nccl_us": _time_graph(nccl, x, ops) * 1e3,
        }
        if fast.fits(x):
            y = fast(torch.full_like(x, float(rank + 1)))
            row["symm_mem_correct"] = bool(torch.all(y == world * (world + 1) / 2).item())
            row["symm_mem_us"] = _time_graph(fast, x, ops) * 1e3
        results.append(row)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--ops", type=int, default=64)
    parser.add_argument("--port", type=int, default=29731)
    args = parser.parse_args()
    if torch.cuda.device_count() < args.world:
        sys.exit(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
    out_path = os.path.join(os.environ.get("OUT", "/tmp"), "allreduce.json")
    mp.spawn(
        _worker, args=(args.world, args.port, args.ops, out_path), nprocs=args.world, join=True
    )
    with open(out_path) as f:
        rows = json.load(f)
    big = rows[-1]
    # bus bandwidth of a ring all-reduce: 2 (n-1)/n of the bytes cross each link
    link_gbps = 2 * (args.world - 1) / args.world * big["bytes"] / (big["nccl_us"] * 1e-6) / 1e9
    print(
        f"{torch.cuda.get_device_name()} x{args.world}; {args.ops} all-reduces per CUDA graph; "
        f"NCCL bus bandwidth at {big['bytes'] >> 20} MiB: {link_gbps:.0f} GB/s"
    )
    print(
        f"{'rows x 4096 bf16':>16s} {'bytes':>9s} {'NCCL us':>9s} {'one-shot us':>12s} {'ratio':>6s} "
        f"{'bytes at link BW us':>20s}"
    )
    for r in rows:
        floor_us = 2 * (args.world - 1) / args.world * r["bytes"] / (link_gbps * 1e9) * 1e6
        fast = r.get("symm_mem_us")
        fast_s = "-" if fast is None else f"{fast:.2f}"
        ratio_s = "-" if fast is None else f"{r['nccl_us'] / fast:.2f}x"
        print(
            f"{r['rows']:16d} {r['bytes']:9d} {r['nccl_us']:9.2f} {fast_s:>12s} {ratio_s:>6s} {floor_us:20.2f}"
            + ("" if r.get("symm_mem_correct", True) else "  ONE-SHOT RESULT WRONG")
        )
    with open(out_path, "w") as f:
        json.dump(
            {
                "world": args.world,
                "ops_per_graph": args.ops,
                "nccl_bus_gbps": link_gbps,
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
