"""Typed errors of the kvtransfer package (internal invariants use asserts)."""

from __future__ import annotations

from engine.errors import TandemError


class KVTransferError(TandemError):
    """Base class of every error kvtransfer raises on purpose."""


class KVLayoutError(KVTransferError, ValueError):
    """Two KV layouts (or a layout and a tensor) disagree; `field` names the mismatch."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidBlockIdsError(KVTransferError, ValueError):
    """Block ids out of range, the reserved null block 0, or a count mismatch."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class HandleDecodeError(KVTransferError, ValueError):
    """Bytes that do not decode to a valid KVHandle."""


class UnknownTransferError(KVTransferError, KeyError):
    """No live lease / transfer with this id (never registered, already released or expired)."""

    def __init__(self, transfer_id: str) -> None:
        super().__init__(transfer_id)
        self.transfer_id = transfer_id


class TransferAbortedError(KVTransferError):
    """A transfer stopped before completion (cancelled, timed out, peer gone, bad checksum)."""


class TierFullError(KVTransferError):
    """A tier has no evictable slot left (e.g. every CPU slot is pinned by swapped requests)."""
