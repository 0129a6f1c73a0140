"""p2p transfers of several messages (in-process gloo group, one layer per message): the bytes
are exact; a sender cut after its first message frees every block on both sides and the group
rebuilds; a cancel mid-stream fails the transfer at once, drains the rest and leaves the pair in
step for the next transfer; a transfer whose lease ended is answered with filler (the epoch
survives); an id the sender never registered breaks the epoch, and both sides still free
everything; a view whose copies are group operations is read and written once per transfer."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kvtransfer.cache_view import KVCacheView
from kvtransfer.interfaces import KVPoll
from kvtransfer.transports import p2p_receiver, p2p_sender
from kvtransfer.transports.p2p_link import Generation, LinkState, P2PLink
from tests.distributed.kv_links import P2PPair, in_process_links

L, N, BS, H, D = 4, 24, 4, 2, 8
TIMEOUT_S = 2.0
SRC, DST = [3, 17, 5, 9, 11], [20, 2, 8, 14, 6]


class GroupLikeView(KVCacheView):
    """A view whose copies are group operations (as TPGroupKVView's): its calls are counted."""

    local_copies = False

    def __init__(self, kv_cache: torch.Tensor) -> None:
        super().__init__(kv_cache)
        self.calls: list[tuple[str, tuple[int, int] | None]] = []

    def read_indexed(
        self,
        index: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        self.calls.append(("read", layers))
        return super().read_indexed(index, heads, layers)

    def write_indexed(
        self,
        index: torch.Tensor,
        data: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        self.calls.append(("write", layers))
        super().write_indexed(index, data, heads, layers)


@pytest.fixture
def pair(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[P2PPair]:
    for module in (p2p_sender, p2p_receiver):
        monkeypatch.setattr(
            module,
            "layer_chunks",
            lambda num_layers, num_bytes: [(i, i + 1) for i in range(num_layers)],
        )
    p = P2PPair(
        in_process_links(2, timeout_s=20.0, rebuild_timeout_s=5.0),
        (L, 2, N, BS, H, D),
        TIMEOUT_S,
        getattr(request, "param", KVCacheView),
    )
    yield p
    p.close()


def _on_second_send(monkeypatch: pytest.MonkeyPatch, link: P2PLink, action: object) -> None:
    """Runs `action(gen)` right before the sender posts its second message."""
    real, count = link.post_send, [0]

    def post_send(gen: Generation, tensor: torch.Tensor, peer: int) -> object:
        count[0] += 1
        if count[0] == 2:
            action(gen)  # type: ignore[operator]
        return real(gen, tensor, peer)

    monkeypatch.setattr(link, "post_send", post_send)


def test_every_message_lands_exactly(pair: P2PPair, monkeypatch: pytest.MonkeyPatch) -> None:
    link, receives = pair.links[1], []
    real_post_recv = link.post_recv

    def post_recv(gen: Generation, tensor: torch.Tensor, peer: int) -> object:
        receives.append(tensor.shape[0])
        return real_post_recv(gen, tensor, peer)

    monkeypatch.setattr(link, "post_recv", post_recv)
    pair.receiver.start(pair.register("t1", SRC), DST)
    assert pair.finish("t1") is KVPoll.DONE, pair.receiver.failure_reason("t1")
    assert receives == [1] * L  # one message per layer
    assert torch.equal(pair.dst.read_blocks(DST), pair.src.read_blocks(SRC))
    stamps = pair.receiver.stamps("t1")
    assert stamps["posted"] <= stamps["landed"]
    assert pair.sender_released("t1") == ["t1"] and pair.received == []


def test_sender_cut_after_its_first_message_frees_both_sides(
    pair: P2PPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sender's communicator dies after its first message and stays dead for this transfer
    (every later send of it fails, on any epoch: a receiver that retries on a rebuilt epoch
    would otherwise succeed, which is the link's job but not this test's): the receiver fails
    within its timeout and both sides free every block; the rebuilt link then moves the next."""
    link, real, sends, cut = pair.links[0], pair.links[0].post_send, [0], threading.Event()
    cut.set()

    def post_send(gen: Generation, tensor: torch.Tensor, peer: int) -> object:
        sends[0] += 1
        if cut.is_set() and sends[0] >= 2:
            link.fail(gen, "injected: the communicator died mid-stream")
        return real(gen, tensor, peer)

    monkeypatch.setattr(link, "post_send", post_send)
    start = time.monotonic()
    pair.receiver.start(pair.register("t1", SRC), DST)
    assert pair.finish("t1") is KVPoll.FAILED
    assert time.monotonic() - start < TIMEOUT_S + 1.0  # gloo: the receive waits out its deadline
    assert pair.received == [("t1", DST)]
    assert pair.sender_released("t1") == ["t1"]  # the failure notice ended the lease
    assert pair.sender.leases.num_live() == 0
    cut.clear()
    deadline = time.monotonic() + 5
    while not (
        len({link.epoch for link in pair.links}) == 1
        and pair.links[0].epoch >= 2
        and all(link.state is LinkState.READY for link in pair.links)
    ):
        assert time.monotonic() < deadline, pair.epochs()
        time.sleep(0.01)
    pair.receiver.start(pair.register("t2", SRC), DST)
    assert pair.finish("t2") is KVPoll.DONE, pair.receiver.failure_reason("t2")
    assert torch.equal(pair.dst.read_blocks(DST), pair.src.read_blocks(SRC))


def test_cancel_mid_stream_fails_at_once_and_keeps_the_pair_in_step(
    pair: P2PPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    stalled, go_on = threading.Event(), threading.Event()
    _on_second_send(monkeypatch, pair.links[0], lambda gen: (stalled.set(), go_on.wait(10.0)))
    pair.receiver.start(pair.register("t1", SRC), DST)
    assert stalled.wait(5.0)
    deadline = time.monotonic() + 5
    while pair.receiver.poll("t1") is not KVPoll.TRANSFERRING:  # the first message landed
        assert time.monotonic() < deadline
        time.sleep(0.002)
    start = time.monotonic()
    pair.receiver.cancel("t1")
    assert pair.finish("t1") is KVPoll.FAILED
    assert time.monotonic() - start < 0.5  # not at the deadline: nothing was being written
    assert pair.received == [("t1", DST)]
    go_on.set()  # the rest arrives and is drained, not written
    assert pair.sender_released("t1") == ["t1"]
    pair.receiver.start(pair.register("t2", [1, 2]), [3, 4])
    assert pair.finish("t2") is KVPoll.DONE, pair.receiver.failure_reason("t2")
    assert torch.equal(pair.dst.read_blocks([3, 4]), pair.src.read_blocks([1, 2]))
    assert pair.epochs() == [1, 1]  # in step: nothing was broken
    assert pair.received == [("t1", DST)]


def test_a_transfer_whose_lease_ended_is_filled_and_the_epoch_survives(pair: P2PPair) -> None:
    handle = pair.register("t1", SRC)
    pair.sender.fail("t1", "request aborted")
    assert pair.sender.poll() == ["t1"]
    pair.receiver.start(handle, DST)
    assert pair.finish("t1") is KVPoll.FAILED
    assert "filled" in (pair.receiver.failure_reason("t1") or "")
    assert pair.received == [("t1", DST)]
    pair.receiver.start(pair.register("t2", SRC), DST)
    assert pair.finish("t2") is KVPoll.DONE, pair.receiver.failure_reason("t2")
    assert torch.equal(pair.dst.read_blocks(DST), pair.src.read_blocks(SRC))
    assert pair.epochs() == [1, 1]


def test_an_id_the_sender_never_registered_breaks_the_epoch_and_frees_both_sides(
    pair: P2PPair,
) -> None:
    handle = dataclasses.replace(pair.register("t1", SRC), transfer_id="never-registered")
    start = time.monotonic()
    pair.receiver.start(handle, DST)
    assert pair.finish("never-registered") is KVPoll.FAILED
    assert time.monotonic() - start < TIMEOUT_S  # the answer fails it, not the deadline
    assert pair.received == [("never-registered", DST)]
    deadline = time.monotonic() + 5
    while pair.epochs() != [2, 2]:  # the posted receives could never match: epoch 1 is gone
        assert time.monotonic() < deadline, pair.epochs()
        time.sleep(0.01)
    pair.receiver.start(pair.register("t2", SRC), DST)
    assert pair.finish("t2") is KVPoll.DONE, pair.receiver.failure_reason("t2")
    assert pair.sender_released("t2") == ["t2"]
    pair.sender.fail("t1", "its receiver named another id")
    assert pair.sender.poll() == ["t1"] and pair.sender.num_leased() == 0


@pytest.mark.parametrize("pair", [GroupLikeView], indirect=True)
def test_a_view_of_group_copies_is_read_and_written_once_per_transfer(pair: P2PPair) -> None:
    pair.receiver.start(pair.register("t1", SRC), DST)
    assert pair.finish("t1") is KVPoll.DONE, pair.receiver.failure_reason("t1")
    assert isinstance(pair.src, GroupLikeView) and isinstance(pair.dst, GroupLikeView)
    assert pair.src.calls == [("read", None)] and pair.dst.calls == [
        ("write", (0, L))
    ]  # L messages each way
    assert torch.equal(pair.dst.read_blocks(DST), pair.src.read_blocks(SRC))
