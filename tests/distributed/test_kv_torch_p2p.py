"""torch_p2p transport between two real processes (gloo on CPU): prefill rank 0 -> decode rank 1.

Each process also holds a default torch.distributed group (as a worker's TP group would): the
KV group is a separate, standalone group joined through `pool_link`, and both keep working."""

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
from kvtransfer.interfaces import KVPoll
from kvtransfer.pool_link import KVGroupSpec, make_receiver, make_sender

L, N, BS, H, D = 2, 32, 4, 2, 8
SRC_IDS, DST_IDS = [3, 17, 5, 29, 8, 11], [30, 2, 9, 14, 21, 6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sender(store: dist.Store, spec: KVGroupSpec) -> None:
    released: list[str] = []
    view = KVCacheView(torch.randn(L, 2, N, BS, H, D, generator=torch.Generator().manual_seed(7)))
    sender = make_sender(
        view,
        spec,
        worker_id="p0",
        model_salt="m",
        on_release=lambda t, b: released.append(t),
        lease_s=30.0,
        host="127.0.0.1",
    )
    for tid in ("t1", "t2"):
        handle = sender.register(tid, SRC_IDS, [], len(SRC_IDS) * BS, source_p2p_ranks=[0])
        store.set(f"handle-{tid}", handle.to_bytes())
    deadline = time.monotonic() + 20
    while len(released) < 2 and time.monotonic() < deadline:
        sender.poll()
        time.sleep(0.005)
    assert sorted(released) == ["t1", "t2"], released  # both acked by the receiver
    store.set("sender-done", b"1")
    store.get("receiver-done")
    sender.close()


def _receiver(store: dist.Store, spec: KVGroupSpec) -> None:
    expected = KVCacheView(
        torch.randn(L, 2, N, BS, H, D, generator=torch.Generator().manual_seed(7))
    )
    view = KVCacheView(torch.zeros(L, 2, N, BS, H, D))
    receiver = make_receiver(view, spec, on_release=lambda t, b: None, timeout_s=15)
    for tid, dst in (("t1", DST_IDS), ("t2", [i + 1 for i in range(len(SRC_IDS))])):
        receiver.start(KVHandle.from_bytes(store.get(f"handle-{tid}")), dst)
    for tid in ("t1", "t2"):
        deadline = time.monotonic() + 15
        while (
            receiver.poll(tid) not in (KVPoll.DONE, KVPoll.FAILED) and time.monotonic() < deadline
        ):
            time.sleep(0.005)
        assert receiver.poll(tid) is KVPoll.DONE, receiver.failure_reason(tid)
    assert torch.equal(view.read_blocks(DST_IDS), expected.read_blocks(SRC_IDS))
    assert torch.equal(
        view.read_blocks([i + 1 for i in range(len(SRC_IDS))]), expected.read_blocks(SRC_IDS)
    )
    store.get("sender-done")
    store.set("receiver-done", b"1")
    receiver.close()


def _worker(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )  # the "TP" group
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:  # picked late: the default group's own sockets took their ports already
        store.set("kv-port", str(_free_port()))
    spec = KVGroupSpec(
        f"tcp://127.0.0.1:{int(store.get('kv-port'))}", rank, 2, "gloo", timeout_s=30.0
    )
    try:
        (_sender if rank == 0 else _receiver)(store, spec)
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)  # the default group still works beside the KV group
        assert total.item() == 3.0 and dist.get_world_size() == 2
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_p2p_transfer_between_two_processes() -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)
