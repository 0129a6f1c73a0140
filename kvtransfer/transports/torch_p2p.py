"""torch.distributed point-to-point transport (NCCL between GPUs, gloo on CPU for tests).

Data plane: layer-major messages per (transfer, head slice): the sender gathers the leased
blocks into contiguous staging tensors [l, 2, n, bs, h, D] (small messages waste the link: 4 MiB
reach 66 GB/s on NVLink, 134 MiB 343 GB/s) and `send`s them; the receiver `recv`s into buffers
of the same shapes and scatters each into its destination blocks as it lands.

Control plane (the side channel): the receiver asks the sender with the gRPC unary
`PrepareSend(transfer_id, receiver_rank, heads, epoch)`; the sender validates the lease,
gathers the staging tensors, queues the sends on its per-peer FIFO thread and answers with
the byte count, or rejects (unknown / expired transfer; `retry` when only the epoch was
wrong). Acks use the gRPC `Ack` as in the gRPC transport. The link (`P2PLink`, p2p_link.py)
is a standalone process group of all KV-moving workers with rebuild-after-failure; ranks are
group-local.

Ordering: NCCL matches sends and receives per pair in issue order (tags are ignored), so each
side serializes per peer: the receiver holds a per-source lock from PrepareSend until its
receives completed, the sender sends in PrepareSend order.

Hazard: NCCL makes a pair's communicator at the pair's first send/recv of an epoch, and that
blocks until the peer makes it too. The sends are therefore posted on the per-peer thread after
PrepareSend answered (posting them inside the handler deadlocks: the receiver posts its
receives only once it has the answer).

Failure: a send or receive that fails or times out, or a PrepareSend whose outcome is unknown
(the sender may have queued a send nobody will receive), breaks the link's generation; both
sides rebuild it (epoch + 1). The transfer fails unless its receiver can still retry it in
time on the new epoch (a break caused elsewhere in the group). A cancelled transfer drains its
posted receives (keeping the pair in step) and writes nothing more. When the link failed for
good, receivers pull over gRPC (`GrpcReceiver`), which every p2p sender also serves.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import TransferAbortedError, UnknownTransferError
from kvtransfer.interfaces import ReleaseCallback
from kvtransfer.receiver import Transfer
from kvtransfer.reshard import HeadSlice
from kvtransfer.transports.grpc_stream import GrpcReceiver, GrpcSender
from kvtransfer.transports.p2p_link import (
    Generation,
    LinkBrokenError,
    LinkFailedError,
    LinkState,
    P2PLink,
)
from tandem.api import kvtransfer_pb2 as pb

__all__ = ["LinkBrokenError", "P2PLink", "TorchP2PReceiver", "TorchP2PSender", "layer_chunks"]

_CHUNK_BYTES = 128 << 20
_MAX_CHUNKS = 8
_MAX_ATTEMPTS = 3  # per head slice: a generation broken elsewhere in the group is retried


def layer_chunks(num_layers: int, num_bytes: int) -> list[tuple[int, int]]:
    """Layer ranges of one transfer's messages. Both sides derive them from the same two
    numbers. Large transfers go in up to 8 messages of >= 128 MiB (the link is near its peak
    there), so gathering chunk k+1 and scattering chunk k overlap the transfer of the others."""
    k = max(1, min(_MAX_CHUNKS, num_layers, num_bytes // _CHUNK_BYTES))
    bounds = [round(i * num_layers / k) for i in range(k + 1)]
    return list(zip(bounds, bounds[1:]))


@dataclass(frozen=True)
class _Send:
    transfer_id: str
    chunks: list[torch.Tensor]  # layer-major staging tensors, sent in order
    peer: int
    deadline: float
    gen: Generation  # acquired in PrepareSend, released by the send thread


class TorchP2PSender(GrpcSender):
    """GrpcSender (control + fallback Pull) that answers PrepareSend with a p2p send."""

    def __init__(
        self,
        view: KVCacheView,
        link: P2PLink,
        *,
        worker_id: str,
        model_salt: str,
        on_release: ReleaseCallback,
        lease_s: float = 30.0,
        send_timeout_s: float = 30.0,
        **grpc_kwargs: object,
    ) -> None:
        super().__init__(view, worker_id=worker_id, model_salt=model_salt, on_release=on_release, lease_s=lease_s, **grpc_kwargs)  # type: ignore[arg-type]
        self.link = link
        self.send_timeout_s = send_timeout_s
        self.prepare_send_handler = self._prepare_send
        self._queues: dict[int, queue.Queue[_Send | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def _prepare_send(self, request: pb.PrepareSendRequest, context: grpc.ServicerContext) -> pb.PrepareSendReply:
        remaining = context.time_remaining()
        deadline = time.monotonic() + (self.send_timeout_s if remaining is None else remaining)
        try:
            if self.chunk_hook is not None:
                self.chunk_hook(request.transfer_id)
            gen = self.link.acquire_epoch(deadline, request.epoch)
        except LinkBrokenError as exc:
            retry = not isinstance(exc, LinkFailedError)
            return pb.PrepareSendReply(accepted=False, reason=str(exc), epoch=self.link.epoch, retry=retry)
        try:
            return self._queue_sends(request, context, gen)
        except BaseException:
            self.link.release(gen)
            raise

    def _queue_sends(self, request: pb.PrepareSendRequest, context: grpc.ServicerContext, gen: Generation) -> pb.PrepareSendReply:
        """Gathers and queues the sends on `gen`; the per-peer thread then owns `gen`'s use."""
        try:
            chunks = self._gather_chunks(request.transfer_id, (request.head_start, request.head_end))
        except (UnknownTransferError, TransferAbortedError):
            self.link.release(gen)
            return pb.PrepareSendReply(accepted=False, reason=f"unknown transfer id {request.transfer_id!r}")
        if self.chunk_hook is not None:
            self.chunk_hook(request.transfer_id)
        if self._stopped.is_set() or not context.is_active():  # nobody will receive these
            self.link.release(gen)
            return pb.PrepareSendReply(accepted=False, reason="the sender stopped or the receiver gave up")
        if gen.broken.is_set():
            self.link.release(gen)
            return pb.PrepareSendReply(accepted=False, reason=f"epoch {gen.epoch} broke", epoch=self.link.epoch, retry=True)
        deadline = time.monotonic() + self.send_timeout_s
        self._peer_queue(request.receiver_rank).put(_Send(request.transfer_id, chunks, request.receiver_rank, deadline, gen))
        num_bytes = sum(c.numel() * c.element_size() for c in chunks)
        return pb.PrepareSendReply(accepted=True, num_bytes=num_bytes, epoch=gen.epoch)

    def _gather_chunks(self, transfer_id: str, heads: tuple[int, int]) -> list[torch.Tensor]:
        """Layer-major copies of the leased blocks, one per message (enqueued, not awaited: the
        device orders them before the sends and before any later reuse of the blocks)."""
        with self.leases.reader(transfer_id) as lease:
            num_bytes = len(lease.block_ids) * self.view.bytes_per_block(heads[1] - heads[0])
            return [self.view.read_blocks(lease.block_ids, heads, layers)
                    for layers in layer_chunks(self.view.num_layers, num_bytes)]

    def _peer_queue(self, peer: int) -> queue.Queue[_Send | None]:
        with self._lock:
            if peer not in self._queues:
                self._queues[peer] = queue.Queue()
                thread = threading.Thread(target=self._send_loop, args=(self._queues[peer],), daemon=True, name=f"kv-p2p-send-{peer}")
                thread.start()
                self._threads.append(thread)
            return self._queues[peer]

    def _send_loop(self, sends: queue.Queue[_Send | None]) -> None:
        """Posts one peer's sends in PrepareSend order and waits them out (bounded)."""
        while (item := sends.get()) is not None:
            try:
                if not self._stopped.is_set():  # a stopped sender's queued sends are dropped
                    works = [self.link.post_send(item.gen, chunk, item.peer) for chunk in item.chunks]
                    for work, chunk in zip(works, item.chunks):
                        self.link.wait(item.gen, work, chunk, item.deadline)
            except LinkBrokenError:
                pass  # the generation is broken: the receiver fails or retries on the next epoch
            finally:
                self.link.release(item.gen)

    def stop_sending(self) -> None:
        """Posts no more sends and stops the send threads (as if the process died)."""
        self._stopped.set()
        with self._lock:
            for q in self._queues.values():
                q.put(None)

    def close(self) -> None:
        self.stop_sending()
        super().close()


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
        super().__init__(view, on_release=on_release, timeout_s=timeout_s, max_concurrent=max_concurrent, clock=clock)
        self.link = link
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
            raise TransferAbortedError(f"timed out waiting for the earlier transfer from rank {peer}")
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
        raise TransferAbortedError(f"p2p link: gave up after {_MAX_ATTEMPTS} attempts (epoch {self.link.epoch})")

    def _receive(self, job: Transfer, part: HeadSlice, peer: int, gen: Generation, deadline: float) -> int | None:
        """One attempt on generation `gen`: None once the slice landed, or the epoch to retry
        at when the sender could not use `gen` (it is past it, or `gen` broke on its side)."""
        handle, view = job.handle, self.view
        expected = handle.num_blocks * view.bytes_per_block(part.num_heads)
        reply = self._prepare(job, part, peer, gen, deadline)
        if not reply.accepted:
            if reply.retry:
                return reply.epoch
            raise TransferAbortedError(f"sender rejected: {reply.reason}")
        if reply.num_bytes != expected:
            self.link.fail(gen, f"rank {peer} queued {reply.num_bytes} bytes, {expected} expected")
            raise TransferAbortedError(f"size mismatch: {reply.num_bytes} bytes announced")
        chunks = layer_chunks(view.num_layers, expected)
        shape = (2, handle.num_blocks, view.block_size, part.num_heads, view.head_dim)
        buffers = [torch.empty((l1 - l0, *shape), dtype=view.dtype, device=view.device) for l0, l1 in chunks]
        works = [self.link.post_recv(gen, buf, peer) for buf in buffers]  # all posted: NCCL keeps order
        cancelled: TransferAbortedError | None = None
        for work, buf, layers in zip(works, buffers, chunks):
            self.link.wait(gen, work, buf, deadline)
            try:
                job.write_layers(layers, buf, part)  # the scatter of chunk k overlaps recv k+1
            except TransferAbortedError as exc:  # cancelled: drain the rest, keeping the pair in step
                cancelled = exc
        if cancelled is not None:
            raise cancelled
        return None

    def _prepare(self, job: Transfer, part: HeadSlice, peer: int, gen: Generation, deadline: float) -> pb.PrepareSendReply:
        stub = self._channels.stub(job.handle.source_addresses[part.source_rank])
        request = pb.PrepareSendRequest(transfer_id=job.transfer_id, receiver_rank=self.link.rank, head_start=part.src_start,
                                        head_end=part.src_end, epoch=gen.epoch)
        try:
            reply: pb.PrepareSendReply = stub.PrepareSend(request, timeout=max(0.001, deadline - time.monotonic()))
            return reply
        except grpc.RpcError as exc:  # the sender may have queued a send nobody will receive
            self.link.fail(gen, f"PrepareSend to rank {peer} failed: {exc.code()}")
            raise TransferAbortedError(f"PrepareSend failed: {exc.code()}") from exc

    def _peer_lock(self, peer: int) -> threading.Lock:
        with self._locks_lock:
            return self._peer_locks.setdefault(peer, threading.Lock())
