"""Tier bandwidth: CPU tier offload/onload vs a plain pinned copy; NVMe tier vs plain file I/O.

GPU host:  python bench/tiers.py [--nvme-dir /local/disk/dir]   # Llama-3-8B KV blocks, 4k tokens
Anywhere:  python bench/tiers.py --cpu                          # small shapes on CPU
Prints a table; writes $OUT/tiers.json when OUT is set. Target: CPU tier >= 85% of plain copy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

# bench/kvtransfer.py would shadow the kvtransfer package: keep bench/ off the import path.
sys.path = [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))
]

import torch

from engine.kv.block_hash import hash_blocks
from kvtransfer.cache_view import KVCacheView
from kvtransfer.tiers.store import TieredStore


def _timed(fn: Callable[[], object], sync: bool, iters: int) -> float:
    fn()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def _drop_page_cache() -> bool:
    """Make the next reads come from the disk (needs root); False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def _plain_file_io(path: str, data: bytes, chunk: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for i in range(0, len(data), chunk):
            f.write(data[i : i + chunk])
        f.flush()
    os.sync()  # the same durability as the tier write below
    write_s = time.perf_counter() - t0
    _drop_page_cache()
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(chunk):
            pass
    return write_s, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--nvme-dir", default=None)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    layers, heads, dim, dtype = (32, 8, 128, torch.bfloat16) if cuda else (4, 2, 64, torch.float16)
    tokens = args.tokens or (4096 if cuda else 1024)
    n = tokens // 16
    view = KVCacheView(torch.randn(layers, 2, n + 1, 16, heads, dim, device=device).to(dtype))
    ids, per = list(range(1, n + 1)), view.bytes_per_block()
    nbytes = n * per
    hashes = hash_blocks(list(range(tokens)), 16, "bench")
    report: dict[str, object] = dict(
        device=torch.cuda.get_device_name(0) if cuda else "cpu", tokens=tokens, mib=nbytes / 2**20
    )

    # CPU tier vs a plain (pinned when CUDA) copy of the same bytes
    store = TieredStore(view, model_salt="bench", cpu_bytes=(args.iters + 1) * nbytes)
    hashes_0 = hash_blocks(list(range(tokens)), 16, "chain-0")
    chains = iter(
        [hash_blocks(list(range(tokens)), 16, f"chain-{i}") for i in range(args.iters + 1)]
    )
    plain_host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    plain_dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    offload = _timed(
        lambda: store.store(next(chains), view, ids), cuda, args.iters
    )  # fresh blocks each time
    onload = _timed(lambda: store.load(hashes_0, view, ids), cuda, args.iters)
    d2h = _timed(lambda: plain_host.copy_(plain_dev, non_blocking=True), cuda, args.iters)
    h2d = _timed(lambda: plain_dev.copy_(plain_host, non_blocking=True), cuda, args.iters)
    report["cpu_tier"] = dict(
        offload_gbps=nbytes / offload / 1e9,
        onload_gbps=nbytes / onload / 1e9,
        plain_d2h_gbps=nbytes / d2h / 1e9,
        plain_h2d_gbps=nbytes / h2d / 1e9,
    )
    store.close()

    # NVMe tier (everything spills: a CPU tier of 1 block) vs plain sequential file I/O
    with tempfile.TemporaryDirectory(dir=args.nvme_dir) as tmp:
        nv = TieredStore(
            view,
            model_salt="bench",
            cpu_bytes=per,
            nvme_dir=os.path.join(tmp, "tier"),
            nvme_bytes=2 * (nbytes + n * 64),
        )
        t0 = time.perf_counter()
        nv.store(hashes, view, ids)
        nv.flush()
        os.sync()  # count the bytes reaching the disk, as for the plain write
        write_s = time.perf_counter() - t0
        cold = _drop_page_cache()
        t0 = time.perf_counter()
        loaded = nv.load(hashes, view, ids)
        read_s = time.perf_counter() - t0
        nv.close()
        data = plain_host[:nbytes].numpy().tobytes() if cuda else os.urandom(nbytes)
        plain_w, plain_r = _plain_file_io(os.path.join(tmp, "plain.bin"), data, 16 << 20)
        report["nvme_tier"] = dict(
            write_gbps=nbytes / write_s / 1e9,
            read_gbps=nbytes / read_s / 1e9,
            blocks_loaded=loaded,
            plain_write_gbps=nbytes / plain_w / 1e9,
            plain_read_gbps=nbytes / plain_r / 1e9,
            cold_reads=cold,
            note="both writes include os.sync(); reads follow a page-cache drop when cold_reads",
        )
    print(json.dumps(report, indent=2))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tiers.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
