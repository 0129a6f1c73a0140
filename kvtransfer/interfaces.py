"""The transfer seam: a KVSender on the prefill side, a KVReceiver on the decode side.

Every transport (in-process fake, gRPC stream, torch.distributed p2p) implements both; one
conformance suite (tests/engine/test_kvtransfer_conformance.py) runs against all of them.

Ownership of blocks, the one rule: the engine frees a sender's blocks only in the sender's
`on_release`, and a receiver's destination blocks of a failed/cancelled transfer only in the
receiver's `on_release`. On DONE the destination blocks hold the KV and belong to the engine.
Both callbacks run on the engine's thread, inside `poll()` (or `cancel()`), exactly once.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from kvtransfer.handle import KVHandle

ReleaseCallback = Callable[[str, list[int]], None]


class KVPoll(enum.Enum):
    WAITING = "waiting"  # started, no byte written yet
    TRANSFERRING = "transferring"  # bytes are landing in the destination blocks
    DONE = "done"  # every block landed and verified; the sender was acked
    FAILED = "failed"  # see failure_reason(); destination blocks go back via on_release


class KVSender(ABC):
    """Prefill side: leases blocks and serves them until ack, failure notice or expiry."""

    @property
    @abstractmethod
    def address(self) -> str:
        """Where receivers reach this sender (host:port, or an in-process name)."""

    @abstractmethod
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
        """Leases `block_ids` and returns the handle that names them.

        The blocks' KV may still be computing: by default, reads are ordered after the work
        queued on the caller's (the engine's) stream so far. `layer_ready` (one CUDA event per
        layer, from `engine.engine.HeldKVEnqueued`) lets a transport read layer l as soon as
        its event completed, while later layers compute; transports that read on the engine's
        stream may ignore it.

        `num_readers`: destination ranks that will pull from this source rank
        (`reshard.readers_of_source`); the lease ends on the last ack. For a source with TP > 1,
        every rank registers the same transfer id and `source_addresses` lists all ranks'
        addresses (None: this sender alone, TP = 1). The engine must free the blocks only once
        every rank's sender released them.
        """

    @abstractmethod
    def fail(self, transfer_id: str, reason: str) -> bool:
        """Failure notice from the engine (e.g. the request was aborted): ends the lease."""

    @abstractmethod
    def poll(self) -> list[str]:
        """Processes acks, failure notices and expiries; runs `on_release` for each ended lease.

        Non-blocking; returns the transfer ids released in this call.
        """

    @abstractmethod
    def num_leased(self) -> int:
        """Leases not yet released (ACTIVE or DRAINING)."""

    @abstractmethod
    def close(self) -> None:
        """Stops serving and releases every lease (running `on_release`)."""


class KVReceiver(ABC):
    """Decode side: pulls a handle's blocks into destination blocks, polled without blocking."""

    @abstractmethod
    def start(self, handle: KVHandle, dst_block_ids: Sequence[int]) -> None:
        """Begins pulling; returns at once. Raises KVLayoutError / InvalidBlockIdsError for a
        handle that cannot fit this cache (a caller bug), ValueError for a duplicate id."""

    @abstractmethod
    def poll(self, transfer_id: str) -> KVPoll:
        """Non-blocking, safe every engine step, never raises; an unknown id is FAILED.

        Also processes timeouts of every transfer: one that has not finished within
        `timeout_s` of `start` becomes FAILED once its writes have stopped.
        """

    @abstractmethod
    def failure_reason(self, transfer_id: str) -> str | None:
        """Why a transfer FAILED (None while it has not)."""

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Aborts a WAITING / TRANSFERRING transfer; no-op for DONE, FAILED or unknown ids.

        Hazard: the transport may be writing into the destination blocks right now, so they are
        not free when cancel returns: they come back through `on_release` once the write
        stopped (usually inside this call, else on a later poll).
        """

    @abstractmethod
    def close(self) -> None:
        """Cancels every transfer and stops the transport's threads."""
