"""One conformance suite for every KV transport: fake, grpc, torch_p2p (gloo, in-process)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from kvtransfer.cache_view import KVCacheView
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll
from kvtransfer.receiver import ThreadedReceiver
from kvtransfer.sender import LeasedSender
from kvtransfer.transports.fake import FakeFabric, FakeReceiver, FakeSender
from kvtransfer.transports.grpc_stream import GrpcReceiver, GrpcSender
from kvtransfer.transports.torch_p2p import P2PLink, TorchP2PReceiver, TorchP2PSender
from tests.distributed.kv_links import in_process_links

L, N, BS, H, D = 2, 24, 4, 2, 8
SALT = "test-model"
CHUNK = 2 * L * 2 * BS * H * D * 4  # two float32 blocks per chunk: several chunks per transfer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Released:
    calls: list[tuple[str, list[int]]] = field(default_factory=list)

    def __call__(self, transfer_id: str, block_ids: list[int]) -> None:
        self.calls.append((transfer_id, list(block_ids)))

    def ids(self) -> list[str]:
        return [t for t, _ in self.calls]


@dataclass
class Harness:
    sender: LeasedSender
    receiver: ThreadedReceiver
    src: KVCacheView
    dst: KVCacheView
    sent: Released
    received: Released
    clock: FakeClock
    kill: Callable[[], None]
    p2p_ranks: tuple[int, ...] = ()

    def register(self, block_ids: list[int], tid: str | None = None) -> KVHandle:
        tid = tid or uuid.uuid4().hex
        return self.sender.register(
            tid, block_ids, [], len(block_ids) * BS, source_p2p_ranks=self.p2p_ranks or None
        )


def _views() -> tuple[KVCacheView, KVCacheView]:
    return KVCacheView(torch.randn(L, 2, N, BS, H, D)), KVCacheView(torch.zeros(L, 2, N, BS, H, D))


@pytest.fixture(params=["fake", "grpc", "torch_p2p"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    src, dst = _views()
    sent, received, clock = Released(), Released(), FakeClock()
    common = dict(model_salt=SALT, on_release=sent, lease_s=60.0, clock=clock)
    p2p_ranks: tuple[int, ...] = ()
    links: list[P2PLink] = []
    if request.param == "fake":
        fabric = FakeFabric()
        sender: LeasedSender = FakeSender(fabric, "p0", src, **common)
        receiver: ThreadedReceiver = FakeReceiver(
            fabric, dst, on_release=received, timeout_s=2.0, chunk_bytes=CHUNK
        )
        kill = lambda: fabric.kill(sender.address)  # noqa: E731
    elif request.param == "grpc":
        sender = GrpcSender(src, worker_id="p0", chunk_bytes=CHUNK, **common)
        receiver = GrpcReceiver(dst, on_release=received, timeout_s=2.0, chunk_bytes=CHUNK)
        kill = sender.stop_serving
    else:
        links = in_process_links(2, timeout_s=20.0, rebuild_timeout_s=5.0)
        sender = TorchP2PSender(src, links[0], worker_id="p0", send_timeout_s=2.0, **common)
        receiver = TorchP2PReceiver(dst, links[1], on_release=received, timeout_s=2.0)
        kill = lambda: (sender.stop_serving(), sender.stop_sending())  # noqa: E731
        p2p_ranks = (0,)
    yield Harness(sender, receiver, src, dst, sent, received, clock, kill, p2p_ranks)
    receiver.close()
    sender.close()
    for link in links:
        link.close()


def wait_terminal(h: Harness, tid: str, within_s: float = 6.0) -> KVPoll:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        state = h.receiver.poll(tid)
        if state in (KVPoll.DONE, KVPoll.FAILED):
            return state
        time.sleep(0.005)
    raise AssertionError(f"{tid} still {state} after {within_s}s")


def wait_sender_released(h: Harness, tid: str, within_s: float = 4.0) -> None:
    deadline = time.monotonic() + within_s
    while tid not in h.sent.ids() and time.monotonic() < deadline:
        h.sender.poll()
        time.sleep(0.005)
    assert h.sent.ids().count(tid) == 1


def test_copy_is_exact_for_random_non_contiguous_blocks(harness: Harness) -> None:
    gen = torch.Generator().manual_seed(0)
    src_ids = (torch.randperm(N - 1, generator=gen)[:9] + 1).tolist()
    dst_ids = (torch.randperm(N - 1, generator=gen)[:9] + 1).tolist()
    handle = harness.register(src_ids)
    harness.receiver.start(KVHandle.from_bytes(handle.to_bytes()), dst_ids)
    assert wait_terminal(harness, handle.transfer_id) is KVPoll.DONE
    assert torch.equal(harness.dst.read_blocks(dst_ids), harness.src.read_blocks(src_ids))
    untouched = sorted(set(range(1, N)) - set(dst_ids))
    assert not harness.dst.read_blocks(untouched).any()
    wait_sender_released(harness, handle.transfer_id)  # the ack ended the lease
    assert harness.sent.calls == [(handle.transfer_id, src_ids)]
    assert harness.received.calls == []  # DONE: destination blocks belong to the engine
    assert harness.sender.num_leased() == 0


def test_receiver_that_never_acks_frees_sender_blocks_at_expiry(harness: Harness) -> None:
    handle = harness.register([3, 4, 5])
    harness.sender.poll()
    assert harness.sent.calls == []
    harness.clock.now += 59.0
    harness.sender.poll()
    assert harness.sent.calls == []
    harness.clock.now += 2.0
    assert harness.sender.poll() == [handle.transfer_id]
    harness.sender.poll()
    assert harness.sent.calls == [(handle.transfer_id, [3, 4, 5])]


def test_sender_killed_mid_stream_fails_receiver_and_frees_both_sides(harness: Harness) -> None:
    killed = threading.Event()
    seen: list[str] = []

    def hook(tid: str) -> None:
        seen.append(tid)
        if len(seen) == 2 and not killed.is_set():
            threading.Thread(target=lambda: (harness.kill(), killed.set())).start()
            killed.wait(5.0)

    harness.sender.chunk_hook = hook
    handle = harness.register(list(range(1, 11)))
    dst_ids = list(range(11, 21))
    t0 = time.monotonic()
    harness.receiver.start(handle, dst_ids)
    assert wait_terminal(harness, handle.transfer_id) is KVPoll.FAILED
    assert time.monotonic() - t0 < 2.0 + 1.5  # within the receiver's timeout (plus slack)
    assert harness.receiver.failure_reason(handle.transfer_id)
    assert harness.received.calls == [(handle.transfer_id, dst_ids)]
    harness.sender.close()  # the dead process frees everything it leased
    assert harness.sent.ids() == [handle.transfer_id]


def test_stalled_sender_times_out_and_failure_notice_frees_lease(harness: Harness) -> None:
    unblock = threading.Event()
    harness.sender.chunk_hook = lambda tid: unblock.wait(10.0)
    handle = harness.register([1, 2, 3, 4])
    harness.receiver.start(handle, [5, 6, 7, 8])
    assert harness.receiver.poll(handle.transfer_id) in (KVPoll.WAITING, KVPoll.TRANSFERRING)
    assert wait_terminal(harness, handle.transfer_id) is KVPoll.FAILED
    assert "timed out" in (harness.receiver.failure_reason(handle.transfer_id) or "")
    assert harness.received.calls == [(handle.transfer_id, [5, 6, 7, 8])]
    unblock.set()
    wait_sender_released(harness, handle.transfer_id)  # via the receiver's failure notice
    assert (
        harness.sender.leases.released[
            next(r for r in harness.sender.leases.released if r.value == "failed")
        ]
        == 1
    )


def test_cancel_mid_transfer_releases_destination_once(harness: Harness) -> None:
    unblock = threading.Event()
    harness.sender.chunk_hook = lambda tid: unblock.wait(10.0)
    handle = harness.register([1, 2])
    harness.receiver.start(handle, [3, 4])
    harness.receiver.cancel(handle.transfer_id)
    assert wait_terminal(harness, handle.transfer_id) is KVPoll.FAILED
    harness.receiver.cancel(handle.transfer_id)  # no-op once FAILED
    unblock.set()
    assert harness.received.calls == [(handle.transfer_id, [3, 4])]
    assert harness.receiver.failure_reason(handle.transfer_id) == "cancelled"


def test_unknown_transfer_id_is_failed(harness: Harness) -> None:
    assert harness.receiver.poll("never-started") is KVPoll.FAILED
    assert "unknown" in (harness.receiver.failure_reason("never-started") or "")
    handle = harness.register([1, 2, 3])
    harness.sender.fail(handle.transfer_id, "request aborted")  # the sender no longer serves it
    harness.sender.poll()
    assert harness.sent.ids() == [handle.transfer_id]
    harness.receiver.start(handle, [4, 5, 6])
    assert wait_terminal(harness, handle.transfer_id) is KVPoll.FAILED
    assert harness.received.calls == [(handle.transfer_id, [4, 5, 6])]
    assert harness.sent.ids() == [handle.transfer_id]  # released exactly once
