"""The KV transports a pool worker uses, built from one small spec: gRPC alone, or
torch.distributed point-to-point (NCCL on GPUs) over a process group that spans the KV-moving
workers of a cluster (prefill and decode), with gRPC as its control channel.

`KVGroupSpec` is plain data (it crosses Ray calls). Joining the group is a collective: every
worker named in it must construct its transport concurrently (the launcher starts all actors
before awaiting any). Hazard: the group is the process's default torch.distributed group, so a
worker that also runs tensor parallelism in-process cannot use it (TP followers are separate
processes; rank 0's TP group would collide): the launcher refuses that combination.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

from kvtransfer.cache_view import KVCacheView
from kvtransfer.interfaces import KVReceiver, KVSender, ReleaseCallback


@dataclass(frozen=True)
class KVGroupSpec:
    init_method: str  # tcp://127.0.0.1:PORT
    rank: int
    world_size: int
    backend: str = "nccl"  # "gloo" on CPU
    timeout_s: float = 120.0


def _join(spec: KVGroupSpec) -> Any:
    import torch.distributed as dist

    from kvtransfer.transports.torch_p2p import P2PLink

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if not dist.is_initialized():
        dist.init_process_group(spec.backend, init_method=spec.init_method, rank=spec.rank,
                                world_size=spec.world_size, timeout=datetime.timedelta(seconds=spec.timeout_s))
    group = dist.group.WORLD
    assert group is not None, "init_process_group ran above"
    return P2PLink(group, spec.rank)


def make_sender(view: KVCacheView, group: KVGroupSpec | None, *, worker_id: str, model_salt: str,
                on_release: ReleaseCallback, lease_s: float, host: str) -> KVSender:
    if group is None:
        from kvtransfer.transports.grpc_stream import GrpcSender

        return GrpcSender(view, worker_id=worker_id, model_salt=model_salt, on_release=on_release,
                          lease_s=lease_s, host=host)
    from kvtransfer.transports.torch_p2p import TorchP2PSender

    return TorchP2PSender(view, _join(group), worker_id=worker_id, model_salt=model_salt,
                          on_release=on_release, lease_s=lease_s, host=host)


def make_receiver(view: KVCacheView, group: KVGroupSpec | None, *, on_release: ReleaseCallback,
                  timeout_s: float) -> KVReceiver:
    if group is None:
        from kvtransfer.transports.grpc_stream import GrpcReceiver

        return GrpcReceiver(view, on_release=on_release, timeout_s=timeout_s)
    from kvtransfer.transports.torch_p2p import TorchP2PReceiver

    return TorchP2PReceiver(view, _join(group), on_release=on_release, timeout_s=timeout_s)
