"""TPGroupKVView: the KV cache of a whole tensor-parallel group, seen from rank 0.

A pool worker with `tensor_parallel_size > 1` is rank 0 of a TP group, and its own cache holds
only its share of the KV heads (kvtransfer.reshard.rank_heads; heads are replicated when there
are fewer KV heads than ranks). This view presents every head as one TP = 1 cache,
`TPLayout(0, 1, num_kv_heads)`, with KVCacheView's `read_blocks` / `write_blocks` signatures and
semantics (an optional head range, now over all heads, and layer range), so the senders,
receivers, the tier store and the preemption swap use it unchanged, whatever the TP size of the
worker at the other end.

Each non-empty call is a group operation through the engine's TP executor (`read_kv` /
`write_kv`, engine.executor.kv_ops): rank 0 publishes the op to its followers on the step
channel, then a read gathers every rank's heads to rank 0 and a write sends each rank its heads
(every replica), over the TP model group. Calls are safe from any thread.

Hazards:
- A call waits for the engine step in flight (the executor's lock) and costs a message plus a
  send per rank: move many blocks per call (the senders already batch blocks into chunks).
- A rank failing during a call fails the whole TP group: the call raises TPGroupError and the
  engine's next step raises it too (a pool worker's engine loop stops and reports unhealthy).
- Arguments are checked here, before anything is published, because followers do not check
  them: bad block ids or ranges raise InvalidBlockIdsError / KVLayoutError and the group stays
  healthy.
- `kv_cache` is rank 0's shard only; go through read_blocks / write_blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from engine.executor.kv_ops import KVOp
from engine.kv.spec import KVCacheSpec
from kvtransfer.cache_view import KVCacheView, TPLayout
from kvtransfer.errors import KVLayoutError


class KVGroup(Protocol):
    """What the view needs of the TP executor (engine.executor.executor.TPExecutor)."""

    def read_kv(self, cache: torch.Tensor, op: KVOp) -> torch.Tensor: ...

    def write_kv(self, cache: torch.Tensor, op: KVOp, data: torch.Tensor) -> None: ...


class TPGroupKVView(KVCacheView):
    """Every KV head of a TP group, from rank 0's `kv_cache` and `group`'s collectives."""

    local_copies = False

    def __init__(
        self,
        kv_cache: torch.Tensor,
        group: KVGroup,
        tp_size: int,
        num_kv_heads: int,
        spec: KVCacheSpec | None = None,
    ) -> None:
        """`spec`: the engine's (rank 0's, of `tp_size`), checked against rank 0's shard; the view's
        own `spec` is that cache unsplit (`with_tp(1)`), as it presents every head."""
        super().__init__(kv_cache, TPLayout(0, tp_size, num_kv_heads), spec)  # rank 0's shard
        self.group = group
        self.tp_size = tp_size
        self.tp = TPLayout(0, 1, num_kv_heads)
        self.spec = self.spec.with_tp(1)
        self.num_local_heads = num_kv_heads

    def read_blocks(
        self,
        block_ids: Sequence[int],
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Copy of blocks `block_ids` (heads `heads` of all, layers `layers`): [L, 2, n, block_size, h, D]."""
        op = self._op(False, block_ids, heads, layers)
        if not op.block_ids:
            return torch.empty(self._shape(op), dtype=self.dtype, device=self.device)
        return self.group.read_kv(self.kv_cache, op)

    def write_blocks(
        self,
        block_ids: Sequence[int],
        data: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        """Writes `data` [L, 2, n, block_size, h, D] into blocks `block_ids` (heads `heads` of all,
        layers `layers`) on every rank that holds those heads."""
        op = self._op(True, block_ids, heads, layers)
        if tuple(data.shape) != self._shape(op):
            raise KVLayoutError(
                "data", f"expected shape {self._shape(op)}, got {tuple(data.shape)}"
            )
        if op.block_ids:
            self.group.write_kv(self.kv_cache, op, data.to(device=self.device, dtype=self.dtype))

    def block_index(self, block_ids: Sequence[int]) -> torch.Tensor:
        """The checked ids as a CPU tensor: the group's ops take ids, not a device index."""
        self.check_block_ids(block_ids, "block_ids")
        return torch.tensor([int(b) for b in block_ids], dtype=torch.int64)

    def read_indexed(
        self,
        index: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        return self.read_blocks(index.tolist(), heads, layers)

    def write_indexed(
        self,
        index: torch.Tensor,
        data: torch.Tensor,
        heads: tuple[int, int] | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        self.write_blocks(index.tolist(), data, heads, layers)

    def read_rows(self, block_ids: Sequence[int]) -> torch.Tensor:
        """KVCacheView.read_rows over every rank's heads (one whole-group read)."""
        blocks = self.read_blocks(block_ids).permute(2, 0, 1, 3, 4, 5).contiguous()
        return blocks.view(torch.uint8).reshape(len(block_ids), -1)

    def write_rows(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """KVCacheView.write_rows onto every rank holding the heads (one whole-group write)."""
        self.write_blocks(
            block_ids, self._blocks_of_rows(block_ids, rows).permute(1, 2, 0, 3, 4, 5)
        )

    def _op(
        self,
        write: bool,
        block_ids: Sequence[int],
        heads: tuple[int, int] | None,
        layers: tuple[int, int] | None,
    ) -> KVOp:
        self.check_block_ids(block_ids, "block_ids")
        heads = _checked_range("heads", heads, self.num_local_heads)
        layers = _checked_range("layers", layers, self.num_layers)
        return KVOp(write, tuple(int(b) for b in block_ids), heads, layers)

    def _shape(self, op: KVOp) -> tuple[int, ...]:
        (h0, h1), (l0, l1) = op.heads, op.layers
        return (l1 - l0, 2, len(op.block_ids), self.block_size, h1 - h0, self.head_dim)


def _checked_range(field: str, value: tuple[int, int] | None, limit: int) -> tuple[int, int]:
    start, end = (0, limit) if value is None else (int(value[0]), int(value[1]))
    if not 0 <= start < end <= limit:
        raise KVLayoutError(field, f"({start}, {end}) is not a non-empty range inside [0, {limit})")
    return start, end
