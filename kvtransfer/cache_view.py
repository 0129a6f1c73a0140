"""KVCacheView: one TP rank's paged KV cache tensor plus its TP layout and KVCacheSpec.

Layout (engine/attention/backend.py): `kv_cache[num_layers, 2, num_blocks, block_size,
num_kv_heads_local, head_dim]`. Block id 0 is the engine's null block: never read or written
here. Reads gather (copy) the blocks, so the result does not alias the cache; on CUDA the
gather is enqueued on the current stream, so a later kernel on that stream that reuses the
blocks is ordered after it.

The view's `spec` (engine/kv/spec.py) is the cache's description: given, the tensor is checked
against it; omitted, it is read off the tensor (shape, dtype) and the TP layout. Byte counts and
block shapes come from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv.spec import KVCacheSpec, KVSpecError, dtype_name
from kvtransfer.errors import InvalidBlockIdsError, KVLayoutError
from kvtransfer.reshard import rank_heads


@dataclass(frozen=True)
class TPLayout:
    tp_rank: int
    tp_size: int
    num_kv_heads: int  # total over all ranks

    def head_range(self) -> tuple[int, int]:
        return rank_heads(self.tp_rank, self.tp_size, self.num_kv_heads)

    @property
    def num_local_heads(self) -> int:
        start, end = self.head_range()
        return end - start


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """The same bytes with the last dimension read as int64 words where the layout allows.

    Block gathers and scatters index the third dimension; the index kernels work element by
    element, so 8-byte words instead of 2-byte elements move the same bytes in a quarter of
    the elements. A view, never a copy; falls back to `t` when the bytes do not line up."""
    size = t.element_size()
    if size >= 8 or t.stride(-1) != 1 or (t.shape[-1] * size) % 8:
        return _as_bytes(t)
    ratio = 8 // size
    if any(stride % ratio for stride in t.stride()[:-1]) or t.storage_offset() % ratio:
        return _as_bytes(t)
    return t.view(torch.int64)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """One-byte (FP8) elements as uint8, a view: torch's CPU index kernels have no FP8 ones."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


class KVCacheView:
    """Block-granular reads and writes of one rank's cache (optionally of a local head slice)."""

    # Each read or write is a device-local copy, enqueued (on CUDA, on the current stream).
    # False in views whose calls are group operations that wait for the engine's step in
    # flight (TPGroupKVView): callers move as much per call as they can there.
    local_copies = True

    def __init__(
        self, kv_cache: torch.Tensor, tp: TPLayout | None = None, spec: KVCacheSpec | None = None
    ) -> None:
        """`tp` defaults to rank 0 of the spec's TP size (TP = 1 without a spec). Raises
        KVLayoutError naming the field where the tensor, `tp` and `spec` disagree."""
        if kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
            raise KVLayoutError(
                "kv_cache", f"expected [L, 2, N, bs, H, D], got {tuple(kv_cache.shape)}"
            )
        if tp is None and spec is not None:
            tp = TPLayout(0, spec.tp_size, spec.num_kv_heads)
        self.tp = tp or TPLayout(0, 1, kv_cache.shape[4])
        if self.tp.num_local_heads != kv_cache.shape[4]:
            raise KVLayoutError(
                "num_kv_heads",
                f"layout says {self.tp.num_local_heads} local heads, tensor has {kv_cache.shape[4]}",
            )
        self.spec = _checked_spec(kv_cache, self.tp, spec)
        self.kv_cache = kv_cache
        (
            self.num_layers,
            _,
            self.num_blocks,
            self.block_size,
            self.num_local_heads,
            self.head_dim,
        ) = kv_cache.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    def block_shape(self, num_heads: int | None = None) -> tuple[int, int, int, int, int]:
        """Shape of one block: [L, 2, block_size, heads, head_dim] (default: this view's heads)."""
        return self.spec.block_shape(self.num_local_heads if num_heads is None else num_heads)

    def bytes_per_block(self, num_heads: int | None = None) -> int:
        """Bytes of one block of `num_heads` heads (default: this view's heads)."""
        return self.spec.bytes_per_block(self.num_local_heads if num_heads is None else num_heads)

    def read_blocks(
        self,
        block_ids: Sequence[int],
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Copy of blocks `block_ids` (local heads `heads`, layers `layers`): [L, 2, n, block_size, h, D]."""
        return self.read_indexed(self.block_index(block_ids), heads, layers)

    def write_blocks(
        self,
        block_ids: Sequence[int],
        data: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        """Writes `data` [L, 2, n, block_size, h, D] into blocks `block_ids` (local heads `heads`,
        layers `layers`)."""
        self.write_indexed(self.block_index(block_ids), data, heads, layers)

    def block_index(self, block_ids: Sequence[int]) -> torch.Tensor:
        """`block_ids`, checked, as the index that `read_indexed` / `write_indexed` take: built once
        for several reads or writes of the same blocks (e.g. layer by layer). On CUDA its copy to
        the device is enqueued on the current stream: use it on that stream."""
        return self._index(block_ids, "block_ids")

    def read_indexed(
        self,
        index: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """`read_blocks` of the blocks `index` names (from `block_index`)."""
        src = self.kv_cache if layers is None else self.kv_cache[layers[0] : layers[1]]
        src = src if heads is None else src[..., heads[0] : heads[1], :]
        return _as_words(src).index_select(2, index).view(src.dtype)

    def write_indexed(
        self,
        index: torch.Tensor,
        data: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        """`write_blocks` into the blocks `index` names (from `block_index`)."""
        h0, h1 = heads if heads is not None else (0, self.num_local_heads)
        l0, l1 = layers if layers is not None else (0, self.num_layers)
        expected = (l1 - l0, 2, index.numel(), self.block_size, h1 - h0, self.head_dim)
        if tuple(data.shape) != expected:
            raise KVLayoutError("data", f"expected shape {expected}, got {tuple(data.shape)}")
        if data.dtype != self.dtype and self.spec.is_scaled:
            raise KVLayoutError("data", f"{data.dtype} into a scaled {self.dtype} cache (no cast)")
        data = data.to(device=self.device, dtype=self.dtype, non_blocking=True)
        dst = self.kv_cache[l0:l1] if layers is not None else self.kv_cache
        dst = dst if heads is None else dst[..., h0:h1, :]
        _as_words(dst).index_copy_(2, index, _as_words(data.contiguous()))

    def read_rows(self, block_ids: Sequence[int]) -> torch.Tensor:
        """Copy of blocks `block_ids` as rows [n, bytes_per_block] of uint8, each the bytes of one
        block's [L, 2, block_size, h, D] (the tier store's layout): one gather over the cache."""
        index = self._index(block_ids, "block_ids")
        rows = _as_words(self.kv_cache).permute(2, 0, 1, 3, 4, 5).index_select(0, index)
        return rows.view(torch.uint8).reshape(len(block_ids), -1)

    def write_rows(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Writes rows from `read_rows` (any device) into blocks `block_ids`: one scatter."""
        blocks = self._blocks_of_rows(block_ids, rows)
        index = self._index(block_ids, "block_ids")
        _as_words(self.kv_cache).permute(2, 0, 1, 3, 4, 5).index_copy_(0, index, _as_words(blocks))

    def _blocks_of_rows(self, block_ids: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
        """`rows` checked and viewed as blocks [n, L, 2, block_size, h, D] on this cache's device."""
        if rows.shape != (len(block_ids), self.bytes_per_block()) or rows.dtype != torch.uint8:
            raise KVLayoutError(
                "rows",
                f"expected uint8 [{len(block_ids)}, {self.bytes_per_block()}], got {rows.dtype} {tuple(rows.shape)}",
            )
        return (
            rows.to(self.device, non_blocking=True)
            .view(self.dtype)
            .reshape(len(block_ids), *self.block_shape())
        )

    def check_block_ids(self, block_ids: Sequence[int], field: str) -> None:
        """Raises InvalidBlockIdsError unless every id names a block of this cache (never 0)."""
        bad = [b for b in block_ids if not 0 < b < self.num_blocks]
        if bad:
            raise InvalidBlockIdsError(
                field, f"{bad[:4]} outside [1, {self.num_blocks}) (0 is the null block)"
            )

    def _index(self, block_ids: Sequence[int], field: str) -> torch.Tensor:
        """The checked ids as an index tensor on the cache's device. On CUDA the copy is enqueued
        from pinned memory: a pageable copy would wait for every kernel already queued."""
        self.check_block_ids(block_ids, field)
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        if self.device.type != "cuda":
            return ids
        return ids.pin_memory().to(self.device, non_blocking=True)


def _checked_spec(kv_cache: torch.Tensor, tp: TPLayout, spec: KVCacheSpec | None) -> KVCacheSpec:
    """`spec` checked against the tensor and layout, or the spec they describe when None."""
    layers, _, _, block_size, _, head_dim = kv_cache.shape
    stored = dtype_name(kv_cache.dtype)
    if spec is not None and spec.kv_dtype != stored:
        raise KVLayoutError("kv_dtype", f"spec says {spec.kv_dtype}, the cache holds {stored}")
    scales = spec.scales if spec is not None else None
    try:
        found = KVCacheSpec(
            layers, tp.num_kv_heads, head_dim, block_size, stored, tp.tp_size, scales
        )
    except KVSpecError as exc:
        raise KVLayoutError(exc.field, exc.message) from exc
    if spec is None:
        return found
    for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
        if getattr(spec, name) != getattr(found, name):
            wanted, held = getattr(spec, name), getattr(found, name)
            raise KVLayoutError(name, f"spec says {wanted}, the cache has {held}")
    return spec
