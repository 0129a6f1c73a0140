"""Eager pair set-up of the KV group (in-process gloo groups): before a link hands out an
epoch, it has exchanged with each of its peers in ascending peer rank (the low rank sending
first), so no transfer's post sets a pair up; again at every rebuilt epoch; a 4-member group
forms without deadlock with all pairs and with prefill x decode pairs only; a member that does
not set its pair up fails the build at the deadline, and bad `peers` are refused."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from kvtransfer.transports import p2p_link
from kvtransfer.transports.p2p_link import LinkFailedError, LinkState, P2PLink
from kvtransfer.transports.p2p_pairs import pair_order
from tests.distributed.kv_links import in_process_links

Call = tuple[str, int, str, int]  # (backend name, rank, "send" | "recv", peer)


class _Recording:
    """A backend that records its sends and receives."""

    def __init__(self, inner: Any, name: str, rank: int, calls: list[Call]) -> None:
        self.inner, self.name, self.rank, self.calls = inner, name, rank, calls

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work:
        self.calls.append((self.name, self.rank, "send", dst_rank))
        return self.inner.send(tensors, dst_rank, tag)

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work:
        self.calls.append((self.name, self.rank, "recv", src_rank))
        return self.inner.recv(tensors, src_rank, tag)

    def __getattr__(self, name: str) -> Any:  # abort / shutdown at teardown
        return getattr(self.inner, name)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    recorded: list[Call] = []
    real = p2p_link.make_backend

    def make(
        kind: str, store: dist.Store, rank: int, size: int, timeout_s: float, name: str
    ) -> Any:
        return _Recording(real(kind, store, rank, size, timeout_s, name), name, rank, recorded)

    monkeypatch.setattr(p2p_link, "make_backend", make)
    return recorded


@pytest.fixture
def closing() -> Iterator[list[P2PLink]]:
    links: list[P2PLink] = []
    yield links
    for link in links:
        link.close()


def _expected(rank: int, peers: list[int]) -> list[tuple[str, int]]:
    return [
        op
        for p in peers
        for op in ((("send", p), ("recv", p)) if rank < p else (("recv", p), ("send", p)))
    ]


def _ops(calls: list[Call], epoch: int, rank: int) -> list[tuple[str, int]]:
    return [
        (op, peer)
        for name, r, op, peer in list(calls)
        if name == f"tandem-kv-e{epoch}" and r == rank
    ]


@pytest.mark.timeout(60)
def test_every_pair_is_set_up_in_order_before_the_link_is_handed_out(
    calls: list[Call], closing: list[P2PLink]
) -> None:
    closing += in_process_links(4, timeout_s=20.0)
    for rank in range(4):
        assert _ops(calls, 1, rank) == _expected(rank, [p for p in range(4) if p != rank])


@pytest.mark.timeout(60)
def test_prefill_by_decode_pairs_only(calls: list[Call], closing: list[P2PLink]) -> None:
    peers = [(2, 3), (2, 3), (0, 1), (0, 1)]  # prefill ranks 0, 1; decode ranks 2, 3
    closing += in_process_links(4, peers=peers, timeout_s=20.0)
    for rank in range(4):
        assert _ops(calls, 1, rank) == _expected(rank, sorted(peers[rank]))
    gens = [link.acquire(time.monotonic() + 5) for link in closing]
    sent, got = torch.arange(6.0), torch.zeros(6)
    send, recv = closing[1].post_send(gens[1], sent, 3), closing[3].post_recv(gens[3], got, 1)
    closing[1].wait(gens[1], send, sent, time.monotonic() + 5)
    closing[3].wait(gens[3], recv, got, time.monotonic() + 5)
    assert torch.equal(got, sent)
    for link, gen in zip(closing, gens):
        link.release(gen)


@pytest.mark.timeout(60)
def test_a_rebuilt_epoch_sets_its_pairs_up_before_it_is_handed_out(
    calls: list[Call], closing: list[P2PLink]
) -> None:
    closing += in_process_links(3, timeout_s=20.0, rebuild_timeout_s=10.0)
    closing[2].fail(closing[2].current, "injected")
    deadline = time.monotonic() + 10
    while not all(link.epoch == 2 and link.state is LinkState.READY for link in closing):
        assert time.monotonic() < deadline, [(link.epoch, link.state) for link in closing]
        time.sleep(0.005)
    for rank in range(3):  # complete as soon as epoch 2 is visible
        assert _ops(calls, 2, rank) == _expected(rank, [p for p in range(3) if p != rank])


@pytest.mark.timeout(60)
def test_a_pair_that_is_not_set_up_fails_the_build_at_the_deadline(closing: list[P2PLink]) -> None:
    store = dist.HashStore()
    results: dict[int, P2PLink | BaseException] = {}

    def make(rank: int, peers: list[int]) -> None:
        try:
            results[rank] = P2PLink(
                dist.PrefixStore("kv/", store), rank, 2, "gloo", timeout_s=1.0, peers=peers
            )
        except BaseException as exc:  # noqa: BLE001 - inspected below
            results[rank] = exc

    start = time.monotonic()
    threads = [
        threading.Thread(target=make, args=(0, [1])),
        threading.Thread(target=make, args=(1, [])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    closing += [r for r in results.values() if isinstance(r, P2PLink)]
    assert isinstance(results[1], P2PLink)  # no pairs to set up
    assert isinstance(results[0], LinkFailedError) and "pair set-up" in str(results[0])
    assert time.monotonic() - start < 1.0 + 2.0  # the deadline plus the helper's grace


def test_bad_peers_are_refused() -> None:
    assert pair_order(2, 4, None) == [0, 1, 3]
    assert pair_order(0, 4, {3, 1}) == [1, 3]
    with pytest.raises(ValueError, match="peers"):
        pair_order(1, 4, [1, 2])
    with pytest.raises(ValueError, match="peers"):
        pair_order(1, 4, [4])
