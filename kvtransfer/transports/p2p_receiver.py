"""TorchP2PReceiver: the receiving half of the p2p transport (protocol: torch_p2p.py).

Per head slice, on the transfer's worker thread and under the per-source lock: ask (PrepareSend,
not awaited), post every receive, take the answer, then scatter each message as it lands, on
the copy stream. Every attempt ends with the pair in step (all posted receives completed) or
with the generation broken.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
import torch.distributed as dist

from kvtransfer.cache_view import KVCacheView
from kvtransfer.copy_stream import CopyStream
from kvtransfer.errors import TransferAbortedError
from kvtransfer.interfaces import ReleaseCallback
from kvtransfer.receiver import Transfer
from kvtransfer.reshard import HeadSlice
from kvtransfer.transports.grpc_stream import GrpcReceiver
from kvtransfer.transports.p2p_link import (
    Generation,
    LinkBrokenError,
    LinkFailedError,
    LinkState,
    P2PLink,
)
from kvtransfer.transports.p2p_plan import layer_chunks
from tandem.api import kvtransfer_pb2 as pb

_MAX_ATTEMPTS = 3  # per head slice: a generation broken elsewhere in the group is retried


@dataclass
class _Posted:
    staging: torch.Tensor  # [L, 2, n, bs, h, D]: every message lands in its layers' slice
    messages: list[
        tuple[dist.Work, torch.Tensor, tuple[int, int]]
    ]  # (receive, its slice, its layers)


class _Drained(TransferAbortedError):
    """The attempt failed, but every receive it posted completed: the pair is in step."""


class TorchP2PReceiver(GrpcReceiver):
    """Receives over the p2p link; pulls over gRPC (the base class) once the link failed for good."""

    def __init__(
        self,
        view: KVCacheView,
        link: P2PLink,
        *,
        on_release: ReleaseCallback,
        timeout_s: float = 30.0,
        max_concurrent: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            view,
            on_release=on_release,
            timeout_s=timeout_s,
            max_concurrent=max_concurrent,
            clock=clock,
        )
        self.link = link
        self._copies = CopyStream(view.device)
        self._peer_locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()

    def _fetch_slice(self, job: Transfer, part: HeadSlice) -> None:
        handle = job.handle
        if not handle.source_p2p_ranks:
            raise TransferAbortedError("handle has no source_p2p_ranks")
        deadline = time.monotonic() + max(0.001, job.deadline - self._clock())
        try:
            self._fetch_p2p(job, part, handle.source_p2p_ranks[part.source_rank], deadline)
        except LinkFailedError:
            super()._fetch_slice(job, part)  # p2p is off for good: pull over gRPC

    def _fetch_p2p(self, job: Transfer, part: HeadSlice, peer: int, deadline: float) -> None:
        if self.link.state is LinkState.FAILED:
            raise LinkFailedError(self.link.reason)
        lock = self._peer_lock(peer)
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TransferAbortedError(
                f"timed out waiting for the earlier transfer from rank {peer}"
            )
        try:
            self._fetch_p2p_locked(job, part, peer, deadline)
        finally:
            lock.release()

    def _fetch_p2p_locked(self, job: Transfer, part: HeadSlice, peer: int, deadline: float) -> None:
        """Attempts on successive epochs: a generation broken elsewhere is retried in time."""
        min_epoch = 0
        for _ in range(_MAX_ATTEMPTS):
            gen = self.link.acquire(deadline, min_epoch)
            try:
                retry_at = self._receive(job, part, peer, gen, deadline)
            except LinkFailedError:
                raise
            except LinkBrokenError as exc:
                if time.monotonic() >= deadline or job.cancelled.is_set():
                    raise TransferAbortedError(f"p2p link: {exc}") from exc
                retry_at = gen.epoch + 1
            finally:
                self.link.release(gen)
            if retry_at is None:
                return
            min_epoch = max(retry_at, gen.epoch + 1)
        raise TransferAbortedError(
            f"p2p link: gave up after {_MAX_ATTEMPTS} attempts (epoch {self.link.epoch})"
        )

    def _receive(
        self, job: Transfer, part: HeadSlice, peer: int, gen: Generation, deadline: float
    ) -> int | None:
        """One attempt on generation `gen`: None once the slice landed, or the epoch to retry
        at when the sender could not use `gen` (it is past it, or `gen` broke on its side).
        Any other exit than `_Drained` breaks `gen`: receives may be posted that nothing will
        match, or sends queued that nobody will receive."""
        expected = job.handle.num_blocks * self.view.bytes_per_block(part.num_heads)
        if expected == 0:
            return None  # a handle without blocks: nothing to move
        answer = self._ask(job, part, gen, deadline)
        try:
            return self._exchange(job, part, peer, gen, deadline, answer, expected)
        except _Drained:
            raise
        except BaseException as exc:
            self.link.fail(
                gen, f"receiving {job.transfer_id} from rank {peer}: {type(exc).__name__}: {exc}"
            )
            raise

    def _exchange(
        self,
        job: Transfer,
        part: HeadSlice,
        peer: int,
        gen: Generation,
        deadline: float,
        answer: grpc.Future,
        expected: int,
    ) -> int | None:
        posted = self._post_receives(
            job, part, peer, gen, expected
        )  # the data need not wait for the answer
        reply = self._answer(answer)
        if reply.num_bytes != expected:  # nothing will fill the posted receives
            if not reply.accepted and reply.retry:
                self.link.fail(gen, f"rank {peer} cannot use epoch {gen.epoch}: {reply.reason}")
                return reply.epoch
            raise TransferAbortedError(
                f"sender rejected: {reply.reason}"
                if not reply.accepted
                else f"size mismatch: {reply.num_bytes} bytes announced, {expected} posted"
            )
        if not reply.accepted:  # filler of the posted sizes: drained, the pair stays in step
            for work, buf, _ in posted.messages:
                self.link.wait(gen, work, buf, deadline)
            raise _Drained(f"sender rejected: {reply.reason}")
        self._land(job, part, gen, deadline, posted)
        return None

    def _ask(self, job: Transfer, part: HeadSlice, gen: Generation, deadline: float) -> grpc.Future:
        """Sends PrepareSend for `part` on `gen`; the answer arrives on the returned future."""
        stub = self._channels.stub(job.handle.source_addresses[part.source_rank])
        request = pb.PrepareSendRequest(
            transfer_id=job.transfer_id,
            receiver_rank=self.link.rank,
            head_start=part.src_start,
            head_end=part.src_end,
            epoch=gen.epoch,
        )
        return stub.PrepareSend.future(request, timeout=max(0.001, deadline - time.monotonic()))

    def _answer(self, answer: grpc.Future) -> pb.PrepareSendReply:
        """The sender's answer (bounded by the call's deadline)."""
        try:
            reply: pb.PrepareSendReply = answer.result()
            return reply
        except grpc.RpcError as exc:  # the outcome is unknown: the sender may have queued a send
            raise TransferAbortedError(f"PrepareSend failed: {exc.code()}") from exc

    def _post_receives(
        self, job: Transfer, part: HeadSlice, peer: int, gen: Generation, num_bytes: int
    ) -> _Posted:
        """Posts a receive per message into its layers of a fresh staging tensor (all at once:
        NCCL keeps their order)."""
        view = self.view
        with self._copies.use():
            job.stamp("posted")
            staging = torch.empty(
                (
                    view.num_layers,
                    2,
                    job.handle.num_blocks,
                    view.block_size,
                    part.num_heads,
                    view.head_dim,
                ),
                dtype=view.dtype,
                device=view.device,
            )
            messages = []
            for layers in layer_chunks(view.num_layers, num_bytes):
                buf = staging[layers[0] : layers[1]]
                messages.append((self.link.post_recv(gen, buf, peer), buf, layers))
        return _Posted(staging, messages)

    def _land(
        self, job: Transfer, part: HeadSlice, gen: Generation, deadline: float, posted: _Posted
    ) -> None:
        """Scatters each message into the destination blocks as it lands (a view whose writes
        are group operations: all at once), on the copy stream, after the engine work queued
        before start(). A cancelled transfer drains the rest."""
        local = self.view.local_copies
        cancelled: TransferAbortedError | None = None
        with self._copies.use():
            self._copies.wait_for(job.engine_ready)
            index = self.view.block_index(job.dst_block_ids[: job.handle.num_blocks])
            for work, buf, layers in posted.messages:
                self.link.wait(gen, work, buf, deadline)
                if cancelled is None and local:
                    cancelled = self._write(job, part, layers, buf, index)
            if cancelled is None and not local:
                cancelled = self._write(job, part, (0, self.view.num_layers), posted.staging, index)
            job.stamp("landed")
        if cancelled is not None:
            raise _Drained(str(cancelled)) from cancelled

    def _write(
        self,
        job: Transfer,
        part: HeadSlice,
        layers: tuple[int, int],
        data: torch.Tensor,
        index: torch.Tensor,
    ) -> TransferAbortedError | None:
        """Writes `data` into `layers`, settled; the refusal of a cancelled transfer, if so."""
        try:
            job.write_layers(layers, data, part, index, self._copies.settle)
            return None
        except (
            TransferAbortedError
        ) as exc:  # cancelled: the caller drains the rest, keeping the pair in step
            return exc

    def _peer_lock(self, peer: int) -> threading.Lock:
        with self._locks_lock:
            return self._peer_locks.setdefault(peer, threading.Lock())
