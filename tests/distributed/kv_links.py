"""In-process KV groups for tests: P2PLinks of every rank over one HashStore (gloo)."""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

import torch.distributed as dist

from kvtransfer.transports.p2p_link import P2PLink


def in_process_links(world_size: int = 2, peers: Sequence[Collection[int] | None] | None = None,
                     **kwargs: float) -> list[P2PLink]:
    """Builds the links concurrently (joining is a collective), one per rank; `peers[rank]` is
    that rank's `peers` (default: every other rank)."""
    store = dist.HashStore()
    links: list[P2PLink | None] = [None] * world_size
    errors: list[BaseException] = []

    def make(rank: int) -> None:
        try:
            links[rank] = P2PLink(dist.PrefixStore("kv/", store), rank, world_size, "gloo",
                                  peers=None if peers is None else peers[rank], **kwargs)
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
