"""Eager pair set-up of a KV group generation: one tiny send/recv each way with every peer.

NCCL makes a pair's communicator and its connections at the pair's first send/recv, blocking
inside that call until the peer makes them too, with no deadline of ours. Done lazily, that
call would be a transfer's first post, which therefore could not run where the peer is not yet
sure to post (it deadlocked inside the PrepareSend handler on 2 x H200). `warm_up` does it for
every pair while the generation is built, before the generation is handed out, so a post never
blocks on set-up.

Order: each member sets up its pairs in ascending peer rank, which is the lexicographic order of
the pairs (low, high): one total order shared by every member. The smallest pair not yet set up
always has both members at it, so the set-up cannot deadlock; it takes at most ~2 x members
pair set-ups one after another. Within a pair the low rank sends first, then receives (the high
rank the reverse), so both directions' connections exist afterwards.

Bounds: the whole set-up runs on a helper thread whose waits end at the deadline; a member
that never sets a pair up (dead, or `peers` not symmetric) fails the build then. The caller
gives the helper a short grace past the deadline to end on its own (gloo aborts the process
when an operation is still pending as the backend goes away), then drops the backend without
tearing it down: a helper blocked inside NCCL's set-up stays blocked until NCCL's own timeout
(the backend's `timeout_s`, or the store's).
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Collection
from typing import Protocol

import torch
import torch.distributed as dist

from kvtransfer.copy_stream import poll_until

_GRACE_S = 1.0
TAG = 7  # the link's one tag (gloo matches on it, NCCL ignores it); the set-up is a pair's first traffic


class Backend(Protocol):
    """What the link uses of a torch.distributed backend (ProcessGroupGloo / ProcessGroupNCCL)."""

    def send(self, tensors: list[torch.Tensor], dst_rank: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src_rank: int, tag: int) -> dist.Work: ...


class PairSetupError(Exception):
    """A pair did not set up before the deadline, or its exchange failed."""


def pair_order(rank: int, world_size: int, peers: Collection[int] | None) -> list[int]:
    """The peers `rank` sets up, in set-up order (`peers` None: every other member)."""
    chosen = set(range(world_size)) - {rank} if peers is None else set(peers)
    bad = sorted(p for p in chosen if not 0 <= p < world_size or p == rank)
    if bad:
        raise ValueError(f"peers: {bad} are not other members of a group of {world_size}")
    return sorted(chosen)


def warm_up(
    backend: Backend, rank: int, peers: list[int], device: torch.device, deadline: float
) -> None:
    """Exchanges one element each way with every peer in `peers` order, by `deadline`
    (time.monotonic). Raises PairSetupError."""
    errors: list[BaseException] = []
    finished = threading.Event()

    def run() -> None:
        try:
            for peer in peers:
                _exchange(backend, rank, peer, device, deadline)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
            errors.append(exc)
        finally:
            finished.set()

    threading.Thread(target=run, daemon=True, name=f"kv-pairs-{rank}").start()
    if not finished.wait(
        max(0.0, deadline - time.monotonic()) + _GRACE_S
    ):  # its own waits end at the deadline
        raise PairSetupError(
            f"rank {rank}: pair set-up with peers {peers} did not finish by the deadline"
        )
    if errors:
        raise PairSetupError(
            f"rank {rank}: pair set-up failed: {type(errors[0]).__name__}: {errors[0]}"
        ) from errors[0]


def _exchange(
    backend: Backend, rank: int, peer: int, device: torch.device, deadline: float
) -> None:
    out, back = torch.full((1,), float(rank), device=device), torch.empty(1, device=device)
    if rank < peer:
        _finish(backend.send([out], peer, TAG), out, peer, deadline)
        _finish(backend.recv([back], peer, TAG), back, peer, deadline)
    else:
        _finish(backend.recv([back], peer, TAG), back, peer, deadline)
        _finish(backend.send([out], peer, TAG), out, peer, deadline)


def _finish(work: dist.Work, tensor: torch.Tensor, peer: int, deadline: float) -> None:
    if tensor.is_cuda and not poll_until(work.is_completed, deadline):
        raise PairSetupError(f"the exchange with rank {peer} did not complete by the deadline")
    work.wait(datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
