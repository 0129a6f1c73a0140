"""TorchP2PSender: the sending half of the p2p transport (protocol: torch_p2p.py).

PrepareSend runs on a gRPC server thread and only decides: it checks the epoch and the lease,
takes a read of the lease and queues the send on the thread of its receiving peer (one per
peer, so sends keep PrepareSend order), which gathers each message on the copy stream, posts
its send at once, lets the read go once the gathers ran, then waits the sends out.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import torch
import torch.distributed as dist

from engine.device_sync import mark_current
from kvtransfer.cache_view import KVCacheView
from kvtransfer.copy_stream import CopyStream
from kvtransfer.errors import TransferAbortedError, UnknownTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import ReleaseCallback
from kvtransfer.transports.grpc_stream import GrpcSender
from kvtransfer.transports.p2p_link import Generation, LinkBrokenError, LinkFailedError, P2PLink
from kvtransfer.transports.p2p_plan import layer_chunks
from tandem.api import kvtransfer_pb2 as pb

log = logging.getLogger(__name__)
_REMEMBERED = 4096  # registered transfers the sender can still fill after their lease ended


@dataclass
class _Registered:
    num_blocks: int
    stamps: dict[str, float]  # "sending": the send thread began (time.perf_counter)


@dataclass
class _Send:
    transfer_id: str
    block_ids: list[int] | None  # None: filler, zeros of `num_blocks` blocks
    num_blocks: int
    heads: tuple[int, int]
    peer: int
    deadline: float
    gen: Generation  # acquired in PrepareSend, released by the send thread
    read: ExitStack  # the lease's read, taken in PrepareSend, ended once the gathers ran

    def drop(self, link: P2PLink) -> None:
        self.read.close()
        link.release(self.gen)


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
        super().__init__(
            view,
            worker_id=worker_id,
            model_salt=model_salt,
            on_release=on_release,
            lease_s=lease_s,
            **grpc_kwargs,  # type: ignore[arg-type]
        )
        self.link = link
        self.send_timeout_s = send_timeout_s
        self.prepare_send_handler = self._prepare_send
        self._copies = CopyStream(view.device)
        self._kv_ready: dict[str, list[Any]] = {}  # transfer id -> per layer: its KV is written
        self._registered: OrderedDict[str, _Registered] = OrderedDict()  # the last _REMEMBERED
        self._queues: dict[int, queue.Queue[_Send | None]] = {}
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def register(
        self,
        transfer_id: str,
        block_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        num_tokens: int,
        *,
        num_readers: int = 1,
        source_addresses: Sequence[str] | None = None,
        source_p2p_ranks: Sequence[int] | None = None,
        layer_ready: Sequence[Any] | None = None,
    ) -> KVHandle:
        """LeasedSender.register. On CUDA each message's gather waits on the device for the KV
        of its layers: for `layer_ready[l1 - 1]` (l1: the message's last layer + 1), so messages
        leave while later layers still compute; without `layer_ready`, for the work queued on
        the caller's (the engine's) stream so far."""
        handle = super().register(
            transfer_id,
            block_ids,
            block_hashes,
            num_tokens,
            num_readers=num_readers,
            source_addresses=source_addresses,
            source_p2p_ranks=source_p2p_ranks,
        )
        if layer_ready is not None and len(layer_ready) != self.view.num_layers:
            raise ValueError(
                f"layer_ready: {len(layer_ready)} events for {self.view.num_layers} layers"
            )
        ready = (
            list(layer_ready)
            if layer_ready is not None
            else [mark_current(self.view.device)] * self.view.num_layers
        )
        if self.view.device.type == "cuda":
            self._kv_ready[transfer_id] = ready
        with self._lock:
            self._registered[transfer_id] = _Registered(len(block_ids), {})
            if len(self._registered) > _REMEMBERED:
                self._registered.popitem(last=False)
        return handle

    def stamps(self, transfer_id: str) -> dict[str, float]:
        """The send's stage times (time.perf_counter, for benchmarks); {} when not remembered."""
        with self._lock:
            registered = self._registered.get(transfer_id)
            return dict(registered.stamps) if registered is not None else {}

    def poll(self) -> list[str]:
        released = super().poll()
        for tid in released:
            self._kv_ready.pop(tid, None)
        return released

    # --- PrepareSend (a gRPC server thread) -----------------------------------------------------
    def _prepare_send(
        self, request: pb.PrepareSendRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSendReply:
        remaining = context.time_remaining()
        deadline = time.monotonic() + (self.send_timeout_s if remaining is None else remaining)
        try:
            if self.chunk_hook is not None:
                self.chunk_hook(request.transfer_id)
            gen = self.link.acquire_epoch(deadline, request.epoch)
        except LinkBrokenError as exc:
            retry = not isinstance(exc, LinkFailedError)
            return pb.PrepareSendReply(
                accepted=False, reason=str(exc), epoch=self.link.epoch, retry=retry
            )
        read, queued = ExitStack(), False
        try:
            reply, queued = self._accept(request, context, gen, read)
            return reply
        finally:
            if not queued:  # a queued send's thread owns `gen` and the read
                read.close()
                self.link.release(gen)

    def _accept(
        self,
        request: pb.PrepareSendRequest,
        context: grpc.ServicerContext,
        gen: Generation,
        read: ExitStack,
    ) -> tuple[pb.PrepareSendReply, bool]:
        """Answers on `gen`: a send of the leased blocks (accepted), filler for a transfer whose
        lease is gone (rejected, with its byte count), or nothing (rejected). True when a send
        was queued: its thread then owns `gen` and `read`, the lease's read."""
        tid, heads = request.transfer_id, (request.head_start, request.head_end)
        if not 0 <= heads[0] < heads[1] <= self.view.num_local_heads:
            return pb.PrepareSendReply(
                accepted=False, reason=f"heads {heads} outside [0, {self.view.num_local_heads})"
            ), False
        try:
            block_ids: list[int] | None = list(
                read.enter_context(self.leases.reader(tid)).block_ids
            )
        except (UnknownTransferError, TransferAbortedError):
            block_ids = None
        num_blocks = len(block_ids) if block_ids is not None else self._remembered(tid)
        if num_blocks is None:
            return pb.PrepareSendReply(accepted=False, reason=f"unknown transfer id {tid!r}"), False
        if self.chunk_hook is not None:
            self.chunk_hook(tid)
        if gen.broken.is_set():
            return pb.PrepareSendReply(
                accepted=False, reason=f"epoch {gen.epoch} broke", epoch=self.link.epoch, retry=True
            ), False
        send = _Send(
            tid,
            block_ids,
            num_blocks,
            heads,
            request.receiver_rank,
            time.monotonic() + self.send_timeout_s,
            gen,
            read,
        )
        num_bytes = num_blocks * self.view.bytes_per_block(heads[1] - heads[0])
        if not context.is_active() or not self._queue(send):  # nobody will receive these
            return pb.PrepareSendReply(
                accepted=False, reason="the sender stopped or the receiver gave up"
            ), False
        if block_ids is None:
            return pb.PrepareSendReply(
                accepted=False,
                reason=f"transfer {tid!r} ended here (filled)",
                num_bytes=num_bytes,
                epoch=gen.epoch,
            ), True
        return pb.PrepareSendReply(accepted=True, num_bytes=num_bytes, epoch=gen.epoch), True

    def _remembered(self, transfer_id: str) -> int | None:
        """The block count of a transfer registered here (one of the last _REMEMBERED)."""
        with self._lock:
            registered = self._registered.get(transfer_id)
            return registered.num_blocks if registered is not None else None

    def _queue(self, send: _Send) -> bool:
        """Queues `send` on its peer's thread (started on first use); False once stopped."""
        with self._lock:
            if self._stopped.is_set():
                return False
            if send.peer not in self._queues:
                self._queues[send.peer] = queue.Queue()
                thread = threading.Thread(
                    target=self._send_loop,
                    args=(self._queues[send.peer],),
                    daemon=True,
                    name=f"kv-p2p-send-{send.peer}",
                )
                thread.start()
                self._threads.append(thread)
            self._queues[send.peer].put(send)
            return True

    # --- the per-peer send threads --------------------------------------------------------------
    def _send_loop(self, sends: queue.Queue[_Send | None]) -> None:
        """Posts one peer's sends in PrepareSend order and waits them out (bounded)."""
        while (item := sends.get()) is not None:
            try:
                self._send(item)
            except LinkBrokenError:
                pass  # the generation is broken: the receiver fails or retries on the next epoch
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory; the thread goes on
                log.exception("kvtransfer: p2p send of %s failed", item.transfer_id)
                self.link.fail(
                    item.gen, f"send of {item.transfer_id} failed: {type(exc).__name__}: {exc}"
                )
            finally:
                item.drop(self.link)

    def _send(self, item: _Send) -> None:
        if self._stopped.is_set():  # its receiver posts receives that nothing will match
            self.link.fail(item.gen, "the sender stopped with a send queued")
            return
        with self._copies.use():
            works = self._post_sends(item)
            for work, chunk in works:
                self.link.wait(item.gen, work, chunk, item.deadline)

    def _post_sends(self, item: _Send) -> list[tuple[dist.Work, torch.Tensor]]:
        """Makes each message (on the copy stream) and posts its send at once; ends the lease's
        read once the gathers ran on the device."""
        num_bytes = item.num_blocks * self.view.bytes_per_block(item.heads[1] - item.heads[0])
        works = []
        with item.read:
            try:
                message = self._messages(item)
                for layers in layer_chunks(self.view.num_layers, num_bytes):
                    chunk = message(layers)
                    works.append((self.link.post_send(item.gen, chunk, item.peer), chunk))
            finally:
                self._copies.settle()
        return works

    def _messages(self, item: _Send) -> Callable[[tuple[int, int]], torch.Tensor]:
        """A message's tensor by its layers: a gather of the leased blocks, or zeros (filler)."""
        view = self.view
        if item.block_ids is None:
            shape = (
                2,
                item.num_blocks,
                view.block_size,
                item.heads[1] - item.heads[0],
                view.head_dim,
            )
            return lambda layers: torch.zeros(
                (layers[1] - layers[0], *shape), dtype=view.dtype, device=view.device
            )
        with self._lock:
            if (registered := self._registered.get(item.transfer_id)) is not None:
                registered.stamps["sending"] = time.perf_counter()
        ready = self._kv_ready.get(item.transfer_id)
        index = view.block_index(item.block_ids)
        if not view.local_copies:  # a group read waits for the engine: one for every message
            self._copies.wait_for(ready[-1] if ready else None)
            whole = view.read_indexed(index, item.heads)
            return lambda layers: whole[layers[0] : layers[1]].contiguous()

        def gather(layers: tuple[int, int]) -> torch.Tensor:
            self._copies.wait_for(
                ready[layers[1] - 1] if ready else None
            )  # these layers' KV is written
            return view.read_indexed(index, item.heads, layers)

        return gather

    def stop_sending(self) -> None:
        """Posts no more sends and stops the send threads (as if the process died)."""
        with self._lock:
            self._stopped.set()
            for q in self._queues.values():
                q.put(None)

    def close(self) -> None:
        self.stop_sending()
        super().close()
        self._kv_ready.clear()
