"""gRPC transport: the sender serves `tandem.v1.KVTransfer/Pull`, a stream of block chunks.

Wire format of a `BlockChunk`: `num_blocks` consecutive blocks of the requested head slice,
each the raw bytes of a contiguous [L, 2, block_size, h, head_dim] tensor of the handle's
dtype (native little-endian), and one crc32 (zlib) per block. The receiver checks block count,
order, sizes and every checksum before writing a block; any mismatch fails the transfer.
Chunks batch blocks up to `chunk_bytes` (4 MiB by default). `Ack(ok)` ends one reader of the
lease, `Ack(!ok)` ends the lease at once. The server binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import torch

from kvtransfer.cache_view import KVCacheView
from kvtransfer.errors import TransferAbortedError, UnknownTransferError
from kvtransfer.handle import KVHandle
from kvtransfer.interfaces import ReleaseCallback
from kvtransfer.receiver import ThreadedReceiver, Transfer
from kvtransfer.reshard import HeadSlice
from kvtransfer.sender import DEFAULT_CHUNK_BYTES, LeasedSender
from tandem.api import kvtransfer_pb2 as pb
from tandem.api import kvtransfer_pb2_grpc as pb_grpc

MAX_MESSAGE_BYTES = 256 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
NOTICE_TIMEOUT_S = 2.0
PrepareSendHandler = Callable[[pb.PrepareSendRequest, grpc.ServicerContext], pb.PrepareSendReply]


def block_bytes(chunk: torch.Tensor) -> tuple[bytes, list[int]]:
    """Raw bytes of a contiguous [n, ...] chunk and the crc32 of each of its n blocks."""
    raw = chunk.detach().cpu().contiguous().view(torch.uint8).numpy().data.cast("B")
    per_block = len(raw) // chunk.shape[0]
    crcs = [zlib.crc32(raw[i * per_block : (i + 1) * per_block]) for i in range(chunk.shape[0])]
    return bytes(raw), crcs


class _Servicer(pb_grpc.KVTransferServicer):
    def __init__(self, sender: GrpcSender) -> None:
        self.sender = sender

    def Pull(
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.BlockChunk]:
        heads = (request.head_start, request.head_end)
        chunk_bytes = request.max_chunk_bytes or self.sender.chunk_bytes
        try:
            for first, chunk in self.sender.serve_chunks(request.transfer_id, heads, chunk_bytes):
                data, crcs = block_bytes(chunk)
                yield pb.BlockChunk(
                    first_block=first, num_blocks=chunk.shape[0], block_crc32=crcs, data=data
                )
        except UnknownTransferError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown transfer id {request.transfer_id!r}")
        except TransferAbortedError as exc:
            context.abort(grpc.StatusCode.ABORTED, str(exc))

    def Ack(self, request: pb.AckRequest, context: grpc.ServicerContext) -> pb.AckReply:
        return pb.AckReply(known=self.sender.ack(request.transfer_id, request.ok, request.reason))

    def PrepareSend(
        self, request: pb.PrepareSendRequest, context: grpc.ServicerContext
    ) -> pb.PrepareSendReply:
        handler = self.sender.prepare_send_handler
        if handler is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this sender has no p2p transport")
            raise AssertionError("unreachable: abort raises")
        return handler(request, context)


class GrpcSender(LeasedSender):
    """A LeasedSender with a gRPC server; `address` is host:port once constructed."""

    def __init__(
        self,
        view: KVCacheView,
        *,
        worker_id: str,
        model_salt: str,
        on_release: ReleaseCallback,
        lease_s: float = 30.0,
        host: str = "127.0.0.1",
        port: int = 0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_streams: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            view,
            worker_id=worker_id,
            model_salt=model_salt,
            on_release=on_release,
            lease_s=lease_s,
            clock=clock,
        )
        self.chunk_bytes = chunk_bytes
        self.prepare_send_handler: PrepareSendHandler | None = None
        self._server = grpc.server(futures.ThreadPoolExecutor(max_streams), options=CHANNEL_OPTIONS)
        pb_grpc.add_KVTransferServicer_to_server(_Servicer(self), self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self._address = f"{host}:{bound}"
        self._server.start()

    @property
    def address(self) -> str:
        return self._address

    def stop_serving(self, grace_s: float = 0.0) -> None:
        """Stops the server (in-flight streams are cut); leases stay until poll/close."""
        self._server.stop(grace_s).wait()

    def close(self) -> None:
        self.stop_serving()
        super().close()


class GrpcChannels:
    """One channel per sender address, shared by the receiver's transfers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stubs: dict[str, pb_grpc.KVTransferStub] = {}
        self._channels: list[grpc.Channel] = []

    def stub(self, address: str) -> pb_grpc.KVTransferStub:
        with self._lock:
            if address not in self._stubs:
                channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
                self._channels.append(channel)
                self._stubs[address] = pb_grpc.KVTransferStub(channel)
            return self._stubs[address]

    def notify(self, address: str, transfer_id: str, ok: bool, reason: str) -> None:
        try:
            self.stub(address).Ack(
                pb.AckRequest(transfer_id=transfer_id, ok=ok, reason=reason),
                timeout=NOTICE_TIMEOUT_S,
            )
        except grpc.RpcError:
            pass  # a dead sender frees its blocks with its process; a live one at lease expiry

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


class GrpcReceiver(ThreadedReceiver):
    def __init__(
        self,
        view: KVCacheView,
        *,
        on_release: ReleaseCallback,
        timeout_s: float = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
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
        self._chunk_bytes = chunk_bytes
        self._channels = GrpcChannels()

    def _fetch_slice(self, job: Transfer, part: HeadSlice) -> None:
        stub = self._channels.stub(job.handle.source_addresses[part.source_rank])
        request = pb.PullRequest(
            transfer_id=job.transfer_id,
            head_start=part.src_start,
            head_end=part.src_end,
            max_chunk_bytes=self._chunk_bytes,
        )
        call = stub.Pull(request, timeout=max(0.001, job.deadline - self._clock()))
        job.on_abort(call.cancel)
        expected = 0
        for msg in call:
            blocks = self._decode(job, part, msg, expected)
            job.write(expected, blocks, part)
            expected += msg.num_blocks
        if expected != job.handle.num_blocks:
            raise TransferAbortedError(
                f"stream ended after {expected} of {job.handle.num_blocks} blocks"
            )

    def _decode(
        self, job: Transfer, part: HeadSlice, msg: pb.BlockChunk, expected: int
    ) -> torch.Tensor:
        if (
            msg.first_block != expected
            or msg.num_blocks < 1
            or len(msg.block_crc32) != msg.num_blocks
        ):
            raise TransferAbortedError(
                f"chunk out of order: first={msg.first_block} expected={expected}"
            )
        per_block = self.view.bytes_per_block(part.num_heads)
        if (
            len(msg.data) != per_block * msg.num_blocks
            or expected + msg.num_blocks > job.handle.num_blocks
        ):
            raise TransferAbortedError(
                f"chunk size {len(msg.data)} != {msg.num_blocks} x {per_block}"
            )
        raw = memoryview(msg.data)
        for i, crc in enumerate(msg.block_crc32):
            if zlib.crc32(raw[i * per_block : (i + 1) * per_block]) != crc:
                raise TransferAbortedError(f"checksum mismatch in block {expected + i}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffer: we only read it
            flat = torch.frombuffer(msg.data, dtype=torch.uint8)
        return flat.view(self.view.dtype).reshape(
            msg.num_blocks, *self.view.block_shape(part.num_heads)
        )

    def _notify(self, handle: KVHandle, source_rank: int, ok: bool, reason: str) -> None:
        self._channels.notify(handle.source_addresses[source_rank], handle.transfer_id, ok, reason)

    def close(self) -> None:
        super().close()
        self._channels.close()
