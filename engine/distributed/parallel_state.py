"""The process's tensor-parallel group. Layers ask for it; at size 1 collectives are identities.

Two process groups back a TP group of size > 1 (see `engine.distributed.process_group`):
`group` carries the model's collectives (NCCL on CUDA, gloo on CPU; short timeout), and
`cpu_group` (gloo, long timeout) carries the leader's step inputs and control values such as
the agreed KV block count. The group is constructed once, its `Reduction` (how it sums partial
results) included, and stays as built until it is torn down.

Hazard: the group is process-global and read by layers at construction; a process hosts at most
one TP group of size > 1 at a time (torch.distributed's default group is process-global too).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import torch
import torch.distributed as dist


class AllReduceMode(str, Enum):
    """How a TP group sums row-parallel partial results (`EngineConfig.tp_all_reduce`).

    AUTO is a request only: the group is built with a concrete mode
    (engine.distributed.fast_allreduce.choose_reduction). SKIP is for measurement only: ranks do
    not sum at all and outputs are wrong (bench/tp.py times a step without its all-reduces)."""

    AUTO = "auto"  # FUSED on CUDA where every rank can map its peers, else SYMM_MEM, else NCCL
    NCCL = "nccl"  # the process group's all-reduce (gloo on CPU)
    SYMM_MEM = "symm_mem"  # a one-shot symmetric-memory kernel for small messages, NCCL above
    FUSED = "fused"  # SYMM_MEM, and the all-reduce fused with the residual add and RMSNorm
    SKIP = "skip"

    @classmethod
    def parse(cls, value: str | AllReduceMode) -> AllReduceMode:
        """The mode named `value`; ValueError naming the valid ones otherwise."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"{value!r} is not one of {names}") from None


class FastAllReduce(Protocol):
    """A sum over the group for the messages it `fits` (engine.distributed.fast_allreduce)."""

    def fits(self, x: torch.Tensor) -> bool: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class FusedNorm(Protocol):
    """The all-reduce of a row-parallel partial sum fused with the residual add and RMSNorm that
    follow it, for the inputs it `fits` (engine.distributed.fused_norm). Calls pass a buffer
    `slot`; consecutive calls must alternate slots (checked at every call)."""

    def fits(self, x: torch.Tensor) -> bool: ...

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Reduction:
    """How the group sums partial results, chosen once when the group is built and never
    changed (engine.distributed.fast_allreduce.choose_reduction builds it on every rank alike).

    `fused_norm` is not used by the group's own `all_reduce`: a TP pass over the built model
    (engine.distributed.tp_pass) hands it to the norms that consume row-parallel outputs."""

    mode: AllReduceMode = AllReduceMode.NCCL  # concrete: never AUTO
    label: str = "nccl"  # what runs, for logs and benchmarks ("gloo", "fused-reference", ...)
    fast: FastAllReduce | None = None  # small messages; the process group above its size
    fused_norm: FusedNorm | None = None
    fp32_max_rows: int = 0  # row-parallel partial sums in float32 up to this many rows


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    cpu_group: dist.ProcessGroup | None = None
    control_timeout_s: float = 600.0  # bounds the leader's waits on `cpu_group`
    reduction: Reduction = field(default_factory=Reduction)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def all_reduce_label(self) -> str:
        """What sums partial results here, for logs and benchmarks ("none" at size 1)."""
        return self.reduction.label if self.size > 1 else "none"

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` across ranks: `x` itself summed in place (NCCL, gloo), or a new tensor
        (the one-shot kernel for small messages); callers use the return value."""
        if self.size == 1 or self.reduction.mode is AllReduceMode.SKIP:
            return x
        fast = self.reduction.fast
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
