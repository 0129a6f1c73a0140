"""GPU paths: CUDA caches through the fake and gRPC transports and the pinned CPU tier."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from engine.kv.block_hash import hash_blocks
from kvtransfer.cache_view import KVCacheView
from kvtransfer.interfaces import KVPoll
from kvtransfer.tiers.store import TieredStore
from kvtransfer.transports.fake import FakeFabric, FakeReceiver, FakeSender
from kvtransfer.transports.grpc_stream import GrpcReceiver, GrpcSender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _view(fill: bool) -> KVCacheView:
    shape = (4, 2, 64, 16, 8, 128)
    t = (
        torch.randn(shape, device="cuda").bfloat16()
        if fill
        else torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
    )
    return KVCacheView(t)


@pytest.mark.parametrize("transport", ["fake", "grpc"])
def test_cuda_to_cuda_transfer_is_exact(transport: str) -> None:
    src, dst = _view(True), _view(False)
    fabric = FakeFabric()
    noop = lambda t, b: None  # noqa: E731
    sender = (
        FakeSender(fabric, "p", src, model_salt="m", on_release=noop)
        if transport == "fake"
        else GrpcSender(src, worker_id="p", model_salt="m", on_release=noop)
    )
    receiver = (
        FakeReceiver(fabric, dst, on_release=noop)
        if transport == "fake"
        else GrpcReceiver(dst, on_release=noop)
    )
    handle = sender.register("t", [5, 9, 33, 2], [], 64)
    receiver.start(handle, [7, 1, 60, 12])
    deadline = time.monotonic() + 10
    while receiver.poll("t") not in (KVPoll.DONE, KVPoll.FAILED) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert receiver.poll("t") is KVPoll.DONE, receiver.failure_reason("t")
    torch.cuda.synchronize()
    assert torch.equal(dst.read_blocks([7, 1, 60, 12]), src.read_blocks([5, 9, 33, 2]))
    receiver.close()
    sender.close()


def test_pinned_cpu_and_nvme_tiers_round_trip_from_cuda(tmp_path: Path) -> None:
    src, dst = _view(True), _view(False)
    per = src.bytes_per_block()
    store = TieredStore(
        src, model_salt="m", cpu_bytes=4 * per, nvme_dir=tmp_path, nvme_bytes=32 * (per + 64)
    )
    assert store.cpu.slab.is_pinned()
    hs = hash_blocks(list(range(8 * 16)), 16, "m")
    store.store(hs, src, list(range(1, 9)))
    store.flush()
    assert store.load(hs, dst, list(range(20, 28))) == 8
    torch.cuda.synchronize()
    assert torch.equal(dst.read_blocks(list(range(20, 28))), src.read_blocks(list(range(1, 9))))
    handle = store.swap_out(src, [40, 41])
    store.swap_in(handle, dst, [50, 51])
    torch.cuda.synchronize()
    assert torch.equal(dst.read_blocks([50, 51]), src.read_blocks([40, 41]))
    store.close()


def test_background_spill_from_cuda_keeps_evicted_bytes_when_blocks_are_reused_at_once() -> None:
    src, dst = _view(True), _view(False)
    store = TieredStore(src, model_salt="m", cpu_bytes=64 * src.bytes_per_block())
    ids, hs = list(range(1, 33)), hash_blocks(list(range(32 * 16)), 16, "m")
    evicted = src.read_blocks(ids).clone()
    assert store.spill(hs, src, ids) == 32  # gathered on this stream, copied out on a side stream
    src.kv_cache[:, :, 1:33].fill_(3.0)  # a kernel reuses the blocks at once, no host wait between
    store.flush()
    assert store.load(hs, dst, list(range(32, 64))) == 32  # (a 64-block cache: ids 1 .. 63)
    torch.cuda.synchronize()
    assert torch.equal(dst.read_blocks(list(range(32, 64))), evicted)
    store.close()
