"""KV transfer bandwidth: torch_p2p (NCCL, two GPUs) next to raw send/recv, and gRPC loopback.

GPU host (2 GPUs):  python bench/kvtransfer.py            # Llama-3-8B KV, 1k / 4k / 16k tokens
Anywhere (CPU):     python bench/kvtransfer.py --cpu      # gloo + small shapes, same code path
Per size, medians on the receiver's side:
  raw pipelined  `--iters` back-to-back send/recv of the same bytes, one sync (the link's rate)
  raw single     one send/recv after a barrier, from posting to the data on the device
  p2p transfer   receiver start() to DONE seen by poll (control path, data, scatter)
  p2p data       the same transfer from both sides posted (the later of the receiver's receives
                 and the sender's first gather; one clock, both processes are on this host) to
                 its last scatter on the device
Prints a table; writes $OUT/kvtransfer.json when OUT is set. Target: p2p >= 80% of raw.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import uuid

# This file is named like the package it measures: keep bench/ off the import path (the
# repository root on it, for bench.common).
sys.path = [
    p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))
]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.common import print_table
from kvtransfer.cache_view import KVCacheView
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll
from kvtransfer.transports.grpc_stream import GrpcReceiver, GrpcSender
from kvtransfer.transports.torch_p2p import P2PLink, TorchP2PReceiver, TorchP2PSender

LLAMA3_8B = dict(layers=32, heads=8, head_dim=128, block=16, dtype=torch.bfloat16)
SMALL = dict(layers=4, heads=2, head_dim=64, block=16, dtype=torch.float16)


def _cache(shape: dict, num_blocks: int, device: str) -> KVCacheView:
    t = torch.randn(
        shape["layers"],
        2,
        num_blocks,
        shape["block"],
        shape["heads"],
        shape["head_dim"],
        device=device,
    )
    return KVCacheView(t.to(shape["dtype"]))


def _wait(receiver: TorchP2PReceiver | GrpcReceiver, tid: str) -> None:
    while (state := receiver.poll(tid)) not in (KVPoll.DONE, KVPoll.FAILED):
        time.sleep(0.00002)
    assert state is KVPoll.DONE, receiver.failure_reason(tid)


def _raw_pipelined(nbytes: int, rank: int, device: str, iters: int) -> float:
    """GB/s of `iters` back-to-back messages of `nbytes` (after one warm-up message)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for i in range(iters + 1):
        if i == 1:
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
        dist.send(buf, 1) if rank == 0 else dist.recv(buf, 0)
    _sync(device)
    return nbytes * iters / (time.perf_counter() - t0) / 1e9


def _raw_single(nbytes: int, rank: int, device: str, iters: int) -> float:
    """Median seconds of one message of `nbytes`, on the receiver: posted to landed."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(iters + 1):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        dist.send(buf, 1) if rank == 0 else dist.recv(buf, 0)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _p2p_worker(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    device = f"cuda:{rank}" if not args.cpu else "cpu"
    if not args.cpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "gloo" if args.cpu else "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
    )
    store, shape = dist.distributed_c10d._get_default_store(), SMALL if args.cpu else LLAMA3_8B
    max_blocks = max(args.tokens) // shape["block"]
    view = _cache(shape, max_blocks + 1, device)
    link = P2PLink(
        dist.PrefixStore("kv/", store), rank, 2, "gloo" if args.cpu else "nccl"
    )  # its own group
    side = (
        TorchP2PSender(view, link, worker_id="p", model_salt="m", on_release=lambda t, b: None)
        if rank == 0
        else TorchP2PReceiver(view, link, on_release=lambda t, b: None, timeout_s=120)
    )
    rows = []
    for tokens in args.tokens:
        n = tokens // shape["block"]
        ids = list(range(1, n + 1))
        nbytes = n * view.bytes_per_block()
        pipelined = _raw_pipelined(nbytes, rank, device, args.iters)
        single_s = _raw_single(nbytes, rank, device, args.iters)
        dist.barrier()
        times, data = [], []  # receiver side: start() to DONE with the data on the device (the
        # handle's trip between the processes goes through a TCP store here, the router in a cluster)
        dst_ids = ids[::-1]  # a different destination order than the source
        for _ in range(args.iters + 1):
            tid = uuid.uuid4().hex
            if rank == 0:
                store.set("sum", repr(float(view.read_blocks(ids).float().sum())))
                _sync(device)  # the checksum's reads are done before the receiver's clock starts
                store.set("h", side.register(tid, ids, [], tokens, source_p2p_ranks=[0]).to_bytes())
                store.get("ack")
                store.delete_key("ack")
                store.set("sending", repr(side.stamps(tid)["sending"]))
            else:
                handle = KVHandle.from_bytes(store.get("h"))
                store.delete_key("h")
                _sync(device)
                t0 = time.perf_counter()
                side.start(handle, dst_ids)
                _wait(side, handle.transfer_id)
                _sync(device)
                times.append(time.perf_counter() - t0)
                expected = float(store.get("sum"))
                got = float(view.read_blocks(dst_ids).float().sum())
                assert abs(got - expected) <= 1e-3 * max(1.0, abs(expected)), (got, expected)
                store.set("ack", b"1")
                stamps = side.stamps(handle.transfer_id)
                data.append(stamps["landed"] - max(stamps["posted"], float(store.get("sending"))))
                store.delete_key("sending")
        if rank == 1:
            transfer_s, data_s = statistics.median(times[1:]), statistics.median(data[1:])
            rows.append(
                dict(
                    tokens=tokens,
                    mib=nbytes / 2**20,
                    raw_gbps=pipelined,
                    raw_single_ms=single_s * 1e3,
                    raw_single_gbps=nbytes / single_s / 1e9,
                    transfer_ms=transfer_s * 1e3,
                    p2p_gbps=nbytes / transfer_s / 1e9,
                    data_ms=data_s * 1e3,
                    data_gbps=nbytes / data_s / 1e9,
                    ratio=nbytes / transfer_s / 1e9 / pipelined,
                    data_ratio=single_s / data_s,
                )
            )
    if rank == 1:
        results["p2p"] = rows
    side.close()
    dist.barrier()
    link.close()
    dist.destroy_process_group()


def _grpc(args: argparse.Namespace) -> list[dict]:
    shape = SMALL if args.cpu else LLAMA3_8B
    tokens_list = [t for t in args.tokens if t <= 4096]
    n_max = max(tokens_list) // shape["block"]
    src, dst = _cache(shape, n_max + 1, "cpu"), _cache(shape, n_max + 1, "cpu")
    sender = GrpcSender(src, worker_id="p", model_salt="m", on_release=lambda t, b: None)
    receiver = GrpcReceiver(dst, on_release=lambda t, b: None, timeout_s=300)
    rows = []
    for tokens in tokens_list:
        ids = list(range(1, tokens // shape["block"] + 1))
        t0 = time.perf_counter()
        for _ in range(args.iters):
            handle = sender.register(uuid.uuid4().hex, ids, [], tokens)
            receiver.start(handle, ids)
            _wait(receiver, handle.transfer_id)
        nbytes = len(ids) * src.bytes_per_block()
        rows.append(
            dict(
                tokens=tokens,
                mib=nbytes / 2**20,
                grpc_gbps=nbytes * args.iters / (time.perf_counter() - t0) / 1e9,
            )
        )
        sender.poll()
    receiver.close()
    sender.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="gloo on CPU with small shapes")
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    if not args.cpu and torch.cuda.device_count() < 2:
        print("fewer than 2 CUDA devices: running the CPU version (--cpu)")
        args.cpu = True
    args.tokens = args.tokens or ([256, 1024] if args.cpu else [1024, 4096, 16384])
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_p2p_worker, args=(port, args, results), nprocs=2, join=True)
    report = dict(
        device="cpu/gloo" if args.cpu else torch.cuda.get_device_name(0),
        p2p=list(results["p2p"]),
        grpc=_grpc(args),
    )
    print(f"device: {report['device']}; target: p2p >= 80% of raw")
    print_table(
        "p2p transport next to raw send/recv of the same bytes (medians, receiver side)",
        [
            "tokens",
            "MiB",
            "raw pipelined GB/s",
            "raw single ms",
            "p2p transfer ms",
            "p2p GB/s",
            "p2p / raw",
            "p2p / raw single",
            "p2p data ms",
            "data / raw single",
        ],
        [
            [
                r["tokens"],
                f"{r['mib']:.1f}",
                f"{r['raw_gbps']:.1f}",
                f"{r['raw_single_ms']:.3f}",
                f"{r['transfer_ms']:.3f}",
                f"{r['p2p_gbps']:.1f}",
                f"{r['ratio']:.0%}",
                f"{r['raw_single_ms'] / r['transfer_ms']:.0%}",
                f"{r['data_ms']:.3f}",
                f"{r['data_ratio']:.0%}",
            ]
            for r in report["p2p"]
        ],
    )
    for r in report["grpc"]:
        print(
            f"grpc loopback {r['tokens']:>6} tokens {r['mib']:>8.1f} MiB {r['grpc_gbps']:>7.2f} GB/s"
        )
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "kvtransfer.json"), "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
