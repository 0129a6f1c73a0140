"""The KV transports a pool worker uses, built from one small spec: gRPC alone, or
torch.distributed point-to-point (NCCL on GPUs) over a KV group that spans the KV-moving
workers of a cluster (prefill and decode), with gRPC as its control channel.

`KVGroupSpec` is plain data (it crosses Ray calls). Joining the group is a collective: every
worker named in it must construct its transport concurrently (the launcher starts all actors
before awaiting any). The group is a standalone backend over its own TCPStore (rank 0 hosts it
on the spec's port), never the process's default torch.distributed group, so a worker whose
default group is its tensor-parallel group can join it too. It rebuilds itself after a failure
(transports/p2p_link.py). One link per (group, rank) per process: a sender and a receiver in
the same process share it.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from kvtransfer.cache_view import KVCacheView
from kvtransfer.interfaces import KVReceiver, KVSender, ReleaseCallback

STORE_PREFIX = "tandem-kv/"


@dataclass(frozen=True)
class KVGroupSpec:
    init_method: str  # tcp://127.0.0.1:PORT: rank 0 hosts the group's store there
    rank: int
    world_size: int
    backend: str = "nccl"  # "gloo" on CPU
    timeout_s: float = 120.0  # the first join; also the backend's own operation timeout
    rebuild_timeout_s: float = 30.0  # every member must rejoin within this after a failure
    # The ranks this member moves KV with, both ways (None: every other member). Their pair
    # communicators are set up with each epoch; must be symmetric across the group.
    peers: tuple[int, ...] | None = None


def prefill_decode_peers(roles: list[str]) -> list[tuple[int, ...]]:
    """Each member's peers in a KV group whose members have `roles` ("prefill" / "decode", by
    rank): KV moves only between the two pools, so a prefill rank pairs with every decode rank
    and the reverse; no prefill-prefill or decode-decode communicator is ever set up."""
    unknown = sorted({r for r in roles} - {"prefill", "decode"})
    if unknown:
        raise ValueError(f"roles: {unknown} are not 'prefill' or 'decode'")
    return [tuple(j for j, other in enumerate(roles) if other != role) for role in roles]


_links: dict[tuple[str, int], Any] = {}
_links_lock = threading.Lock()


def join(spec: KVGroupSpec) -> Any:
    """This process's P2PLink of `spec`'s group (built on first use, a collective). On NCCL it
    lives on the current CUDA device, which must be the KV cache's."""
    import torch.distributed as dist

    from kvtransfer.transports.p2p_link import P2PLink

    with _links_lock:
        key = (spec.init_method, spec.rank)
        if key not in _links:
            url = urlparse(spec.init_method)
            if url.scheme != "tcp" or url.hostname is None or url.port is None:
                raise ValueError(f"init_method: {spec.init_method!r} is not tcp://HOST:PORT")
            store = dist.TCPStore(
                url.hostname,
                url.port,
                spec.world_size,
                is_master=spec.rank == 0,
                timeout=datetime.timedelta(seconds=spec.timeout_s),
                wait_for_workers=False,
            )
            _links[key] = P2PLink(
                dist.PrefixStore(STORE_PREFIX, store),
                spec.rank,
                spec.world_size,
                spec.backend,
                timeout_s=spec.timeout_s,
                rebuild_timeout_s=spec.rebuild_timeout_s,
                peers=spec.peers,
            )
        return _links[key]


def make_sender(
    view: KVCacheView,
    group: KVGroupSpec | None,
    *,
    worker_id: str,
    model_salt: str,
    on_release: ReleaseCallback,
    lease_s: float,
    host: str,
) -> KVSender:
    if group is None:
        from kvtransfer.transports.grpc_stream import GrpcSender

        return GrpcSender(
            view,
            worker_id=worker_id,
            model_salt=model_salt,
            on_release=on_release,
            lease_s=lease_s,
            host=host,
        )
    from kvtransfer.transports.torch_p2p import TorchP2PSender

    return TorchP2PSender(
        view,
        join(group),
        worker_id=worker_id,
        model_salt=model_salt,
        on_release=on_release,
        lease_s=lease_s,
        host=host,
    )


def make_receiver(
    view: KVCacheView, group: KVGroupSpec | None, *, on_release: ReleaseCallback, timeout_s: float
) -> KVReceiver:
    if group is None:
        from kvtransfer.transports.grpc_stream import GrpcReceiver

        return GrpcReceiver(view, on_release=on_release, timeout_s=timeout_s)
    from kvtransfer.transports.torch_p2p import TorchP2PReceiver

    return TorchP2PReceiver(view, join(group), on_release=on_release, timeout_s=timeout_s)
