"""Shared helpers for benchmarks: device limits measured in the same run, tables, JSON output."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_time(fn: Callable[[], object], iters: int = 20, warmup: int = 3) -> float:
    """Median seconds of `fn()` on the current device (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 2**31) -> float:
    """Device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), iters=20)
    return 2 * nbytes / t


def matmul_peak(n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Dense matmul FLOP/s on random data (the practical tensor-core ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    t = median_time(lambda: a @ b, iters=10)
    return 2 * n**3 / t


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(x)) for x in [h] + [r[i] for r in rows]) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def write_json(name: str, data: dict) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out, f"{name}.json").write_text(json.dumps(data, indent=1, default=str))


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
