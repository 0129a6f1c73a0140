"""LeasedSender: the transport-independent half of every KVSender (leases and block reads)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from kvtransfer.cache_view import KVCacheView
from kvtransfer.handle import KVHandle, KVLayout
from kvtransfer.interfaces import KVSender, ReleaseCallback
from kvtransfer.lease import LeaseTable

DEFAULT_CHUNK_BYTES = 4 << 20


def view_layout(view: KVCacheView) -> KVLayout:
    """The handle's layout of the view's cache (its KVCacheSpec, as the view presents it)."""
    return KVLayout.from_spec(view.spec)


class LeasedSender(KVSender):
    """Leases + chunked reads; transports add how receivers reach `serve_chunks` and `ack`."""

    def __init__(
        self,
        view: KVCacheView,
        *,
        worker_id: str,
        model_salt: str,
        on_release: ReleaseCallback,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.view = view
        self.worker_id = worker_id
        self.model_salt = model_salt
        self.leases = LeaseTable(lease_s, on_release, clock)
        self._handles: dict[str, KVHandle] = {}
        # Test seam: called with the transfer id before each chunk is read (e.g. to stall or
        # kill the sender mid-stream in the conformance suite; the p2p sender calls it before
        # checking the epoch and again before accepting, right before its sends are posted).
        # None in production.
        self.chunk_hook: Callable[[str], None] | None = None

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
        """KVSender.register. `layer_ready` is not used here: blocks are read on the reading
        thread's current stream, the device's default stream, which the engine's runs on."""
        self.view.check_block_ids(block_ids, "block_ids")  # before leasing
        handle = KVHandle(
            transfer_id=transfer_id,
            source_worker_id=self.worker_id,
            source_addresses=tuple(source_addresses)
            if source_addresses is not None
            else (self.address,),
            layout=view_layout(self.view),
            block_ids=tuple(block_ids),
            block_hashes=tuple(block_hashes),
            num_tokens=num_tokens,
            model_salt=self.model_salt,
            source_p2p_ranks=tuple(source_p2p_ranks or ()),
        )
        self.leases.add(transfer_id, block_ids, num_readers)
        self._handles[transfer_id] = handle
        return handle

    def ack(self, transfer_id: str, ok: bool, reason: str = "") -> bool:
        """Receiver's notice (any thread): ok acks one reader, not ok ends the lease."""
        return self.leases.ack(transfer_id) if ok else self.leases.fail(transfer_id, reason)

    def fail(self, transfer_id: str, reason: str) -> bool:
        return self.leases.fail(transfer_id, reason)

    def poll(self) -> list[str]:
        released = [lease.transfer_id for lease in self.leases.poll()]
        for tid in released:
            self._handles.pop(tid, None)
        return released

    def num_leased(self) -> int:
        return self.leases.num_live()

    def close(self) -> None:
        for lease in self.leases.close():
            self._handles.pop(lease.transfer_id, None)

    def serve_chunks(
        self, transfer_id: str, heads: tuple[int, int], max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields (first block index, blocks [n, L, 2, bs, h, D] contiguous) chunk by chunk.

        Each chunk is copied out under the lease's gate, so an expiry mid-stream ends the
        stream (UnknownTransferError / TransferAbortedError) instead of reading freed blocks.
        """
        with self.leases.reader(transfer_id) as lease:
            block_ids = list(lease.block_ids)
        per_block = self.view.bytes_per_block(heads[1] - heads[0])
        step = max(1, max_chunk_bytes // per_block)
        for first in range(0, len(block_ids), step):
            if self.chunk_hook is not None:
                self.chunk_hook(transfer_id)
            with self.leases.reader(transfer_id):
                data = self.view.read_blocks(block_ids[first : first + step], heads)
                chunk = data.permute(2, 0, 1, 3, 4, 5).contiguous()
            yield first, chunk

    def gather(self, transfer_id: str, heads: tuple[int, int]) -> torch.Tensor:
        """All blocks of a transfer in one contiguous staging tensor [n, L, 2, bs, h, D]."""
        with self.leases.reader(transfer_id) as lease:
            data = self.view.read_blocks(lease.block_ids, heads)
            return data.permute(2, 0, 1, 3, 4, 5).contiguous()
