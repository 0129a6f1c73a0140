"""In-process KV groups for tests: P2PLinks of every rank over one HashStore (gloo), and a
p2p sender / receiver pair over two of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Collection, Sequence

import torch
import torch.distributed as dist

from kvtransfer.cache_view import KVCacheView
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import KVPoll
from kvtransfer.transports.p2p_link import P2PLink
from kvtransfer.transports.torch_p2p import TorchP2PReceiver, TorchP2PSender


def in_process_links(
    world_size: int = 2, peers: Sequence[Collection[int] | None] | None = None, **kwargs: float
) -> list[P2PLink]:
    """Builds the links concurrently (joining is a collective), one per rank; `peers[rank]` is
    that rank's `peers` (default: every other rank)."""
    store = dist.HashStore()
    links: list[P2PLink | None] = [None] * world_size
    errors: list[BaseException] = []

    def make(rank: int) -> None:
        try:
            links[rank] = P2PLink(
                dist.PrefixStore("kv/", store),
                rank,
                world_size,
                "gloo",
                peers=None if peers is None else peers[rank],
                **kwargs,
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised below on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [link for link in links if link is not None]


class P2PPair:
    """Rank 0 sends from `src`, rank 1 receives into `dst` (random and zero KV caches of
    `shape`), both with `timeout_s`; released blocks are recorded in `sent` / `received`."""

    def __init__(
        self,
        links: list[P2PLink],
        shape: tuple[int, ...],
        timeout_s: float,
        view: type[KVCacheView] = KVCacheView,
    ) -> None:
        self.links = links
        self.timeout_s = timeout_s
        self.block_size = shape[3]
        self.src = view(torch.randn(*shape))
        self.dst = view(torch.zeros(*shape))
        self.sent: list[tuple[str, list[int]]] = []
        self.received: list[tuple[str, list[int]]] = []
        self.sender = TorchP2PSender(
            self.src,
            links[0],
            worker_id="p0",
            model_salt="m",
            send_timeout_s=timeout_s,
            on_release=lambda t, b: self.sent.append((t, b)),
        )
        self.receiver = TorchP2PReceiver(
            self.dst,
            links[1],
            timeout_s=timeout_s,
            on_release=lambda t, b: self.received.append((t, b)),
        )

    def register(self, tid: str, src_ids: list[int]) -> KVHandle:
        return self.sender.register(
            tid, src_ids, [], len(src_ids) * self.block_size, source_p2p_ranks=[0]
        )

    def finish(self, tid: str, within_s: float | None = None) -> KVPoll:
        """The receiver's final state of `tid` (fails the test past `within_s`)."""
        deadline = time.monotonic() + (3 * self.timeout_s if within_s is None else within_s)
        while (state := self.receiver.poll(tid)) not in (KVPoll.DONE, KVPoll.FAILED):
            assert time.monotonic() < deadline, f"{tid} still {state}"
            time.sleep(0.002)
        return state

    def sender_released(self, tid: str, within_s: float | None = None) -> list[str]:
        """The transfer ids whose leases the sender released, once `tid` is among them (or time
        is up)."""
        deadline = time.monotonic() + (2 * self.timeout_s if within_s is None else within_s)
        while tid not in [t for t, _ in self.sent] and time.monotonic() < deadline:
            self.sender.poll()
            time.sleep(0.005)
        return [t for t, _ in self.sent]

    def epochs(self) -> list[int]:
        return [link.epoch for link in self.links]

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()
        for link in self.links:
            link.close()
