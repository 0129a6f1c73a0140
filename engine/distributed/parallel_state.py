"""The process's tensor-parallel group. Layers ask for it; at size 1 every collective is an identity.

Two process groups back a TP group of size > 1 (see `engine.distributed.process_group`):
`group` carries the model's collectives (NCCL on CUDA, gloo on CPU; short timeout), and
`cpu_group` (gloo, long timeout) carries the leader's step inputs and control values such as
the agreed KV block count.

Hazard: the group is process-global and read by layers at construction; a process hosts at most
one TP group of size > 1 at a time (torch.distributed's default group is process-global too).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist


class FastAllReduce(Protocol):
    """A sum over the group for the messages it `fits` (engine.distributed.fast_allreduce)."""

    def fits(self, x: torch.Tensor) -> bool: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    control_timeout_s: float = 600.0  # bounds the leader's waits on `cpu_group`
    # engine.distributed.fast_allreduce installs these (every rank alike) before the model is built
    fast_all_reduce: FastAllReduce | None = None
    skip_all_reduce: bool = False  # measurement only: partial sums stay partial
    fp32_reduce_max_rows: int = 0  # row-parallel partial sums in float32 up to this many rows
    fused_norm: Any = None  # engine.distributed.fused_norm: all-reduce + residual add + RMSNorm

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` across ranks: `x` itself summed in place (NCCL, gloo), or a new tensor
        (the one-shot kernel for small messages); callers use the return value."""
        if self.size == 1 or self.skip_all_reduce:
            return x
        fast = self.fast_all_reduce
        if fast is not None and fast.fits(x):
            return fast(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's `x` along the last dimension, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The minimum of `value` over the ranks (e.g. KV blocks that fit on every rank).

        Runs on the CPU group, so ranks that finish loading at different times still meet."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group, async_op=True)
        wait_bounded(work, self.control_timeout_s if self.is_leader else None)
        return int(t.item())


def wait_bounded(work: dist.Work | None, timeout_s: float | None) -> None:
    """Wait for an async collective; `timeout_s` None waits as long as the group's own timeout.

    A timed-out wait raises RuntimeError and leaves the group unusable: callers treat it as the
    whole group failing."""
    if work is None:
        return
    if timeout_s is None:
        work.wait()
    else:
        work.wait(timeout=datetime.timedelta(seconds=timeout_s))


_TP_GROUP = TPGroup()


def get_tp_group() -> TPGroup:
    return _TP_GROUP


def set_tp_group(group: TPGroup) -> None:
    global _TP_GROUP
    _TP_GROUP = group
