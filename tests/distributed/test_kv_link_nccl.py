"""The p2p KV link over NCCL (two processes, one GPU each, each also holding a default NCCL
group as a worker's TP group would): a transfer; a break between transfers (the next one runs
on epoch 2); a break while a receive that will never match is posted (its wait returns at once,
and the epoch's communicator is aborted with the receive still on its stream); then a transfer
on epoch 3; a transfer whose lease ended, answered with filler messages that the receiver drains
(epoch 3 survives); and a transfer of several messages (60 blocks: 3 messages of 1, 2, 1
layers)."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvtransfer.cache_view import KVCacheView
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll, KVReceiver, KVSender
from kvtransfer.pool_link import KVGroupSpec, join, make_receiver, make_sender
from kvtransfer.transports.p2p_link import LinkBrokenError, LinkState, P2PLink

pytestmark = [pytest.mark.gpu, pytest.mark.multi_gpu]

L, N, BS, H, D = 4, 64, 16, 8, 128
SRC_IDS = [3, 17, 5, 29, 8, 11, 40, 41]
DST_IDS = {
    "t1": [30, 2, 9, 14, 21, 6, 50, 51],
    "t2": [1, 2, 3, 4, 5, 6, 7, 8],
    "t3": [60, 61, 62, 63, 10, 11, 12, 13],
}
MANY_SRC, MANY_DST = list(range(1, 61)), list(range(63, 3, -1))  # 60 blocks, 15 MiB: 3 messages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cache(fill: bool, device: torch.device) -> torch.Tensor:
    if not fill:
        return torch.zeros(L, 2, N, BS, H, D, dtype=torch.bfloat16, device=device)
    return (
        torch.randn(L, 2, N, BS, H, D, generator=torch.Generator().manual_seed(7))
        .bfloat16()
        .to(device)
    )


def _wait_epoch(link: P2PLink, epoch: int) -> None:
    deadline = time.monotonic() + 30
    while (
        not (link.epoch >= epoch and link.state is LinkState.READY) and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert link.epoch >= epoch and link.state is LinkState.READY, (
        link.epoch,
        link.state,
        link.reason,
    )


def _sender(store: dist.Store, spec: KVGroupSpec, device: torch.device) -> None:
    link = join(spec)
    released: list[str] = []
    sender = make_sender(
        KVCacheView(_cache(True, device)),
        spec,
        worker_id="p0",
        model_salt="m",
        on_release=lambda t, b: released.append(t),
        lease_s=60.0,
        host="127.0.0.1",
    )
    for tid in ("t1", "t2", "t3"):
        if tid == "t2":
            link.fail(link.current, "injected: failure between transfers")
            _wait_epoch(link, 2)
        if tid == "t3":
            store.get("dangling-recv-posted")
            link.fail(link.current, "injected: failure while a receive is posted")
            _wait_epoch(link, 3)
        store.set(
            f"handle-{tid}",
            sender.register(tid, SRC_IDS, [], len(SRC_IDS) * BS, source_p2p_ranks=[0]).to_bytes(),
        )
        _wait_released(sender, released, tid)
    handle = sender.register("t4", SRC_IDS, [], len(SRC_IDS) * BS, source_p2p_ranks=[0])
    sender.fail(
        "t4", "injected: the request was aborted"
    )  # its lease ends before the receiver asks
    _wait_released(sender, released, "t4")
    store.set("handle-t4", handle.to_bytes())
    store.set(
        "handle-t5",
        sender.register("t5", MANY_SRC, [], len(MANY_SRC) * BS, source_p2p_ranks=[0]).to_bytes(),
    )
    _wait_released(sender, released, "t5")
    store.get("receiver-done")
    assert link.epoch == 3
    sender.close()


def _wait_released(sender: KVSender, released: list[str], tid: str) -> None:
    deadline = time.monotonic() + 30
    while tid not in released and time.monotonic() < deadline:
        sender.poll()
        time.sleep(0.002)
    assert tid in released


def _finish(receiver: KVReceiver, tid: str) -> KVPoll:
    deadline = time.monotonic() + 30
    while (state := receiver.poll(tid)) not in (
        KVPoll.DONE,
        KVPoll.FAILED,
    ) and time.monotonic() < deadline:
        time.sleep(0.002)
    return state


def _receiver(store: dist.Store, spec: KVGroupSpec, device: torch.device) -> None:
    link = join(spec)
    expected = KVCacheView(_cache(True, device)).read_blocks(SRC_IDS)
    view = KVCacheView(_cache(False, device))
    receiver = make_receiver(view, spec, on_release=lambda t, b: None, timeout_s=30)
    for tid, dst in DST_IDS.items():
        if tid == "t3":
            _dangling_recv(link, store, device)
        receiver.start(KVHandle.from_bytes(store.get(f"handle-{tid}")), dst)
        assert _finish(receiver, tid) is KVPoll.DONE, receiver.failure_reason(tid)
        torch.cuda.synchronize()
        assert torch.equal(view.read_blocks(dst), expected), tid
    receiver.start(KVHandle.from_bytes(store.get("handle-t4")), DST_IDS["t1"])
    assert _finish(receiver, "t4") is KVPoll.FAILED
    assert "filled" in (receiver.failure_reason("t4") or ""), receiver.failure_reason("t4")
    receiver.start(KVHandle.from_bytes(store.get("handle-t5")), MANY_DST)
    assert _finish(receiver, "t5") is KVPoll.DONE, receiver.failure_reason("t5")
    torch.cuda.synchronize()
    assert torch.equal(
        view.read_blocks(MANY_DST), KVCacheView(_cache(True, device)).read_blocks(MANY_SRC)
    )
    assert link.epoch == 3  # the filler kept the pair in step
    store.set("receiver-done", b"1")
    receiver.close()


def _dangling_recv(link: P2PLink, store: dist.Store, device: torch.device) -> None:
    gen = link.acquire(time.monotonic() + 10)
    buf = torch.empty(1 << 20, device=device)
    work = link.post_recv(gen, buf, 0)  # rank 0 never sends this
    store.set("dangling-recv-posted", b"1")
    start = time.monotonic()
    with pytest.raises(LinkBrokenError):
        link.wait(gen, work, buf, time.monotonic() + 20)
    assert time.monotonic() - start < 5.0  # returned at the break, not at the deadline
    link.release(gen)  # the last user: the watcher aborts epoch 2's communicator


def _worker(rank: int, port: int) -> None:
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, device_id=device
    )
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:  # picked late: the default group's own sockets took their ports already
        store.set("kv-port", str(_free_port()))
    spec = KVGroupSpec(
        f"tcp://127.0.0.1:{int(store.get('kv-port'))}",
        rank,
        2,
        "nccl",
        timeout_s=60.0,
        rebuild_timeout_s=20.0,
    )
    try:
        (_sender if rank == 0 else _receiver)(store, spec, device)
        total = torch.ones(1, device=device)
        dist.all_reduce(total)  # the default ("TP") group still works beside the KV group
        assert total.item() == 2.0
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_nccl_kv_link_rebuilds_after_breaks() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)
