"""The row-parallel all-reduce fused with the residual add and RMSNorm that always follows it.

In a Llama block every row-parallel output (o_proj, down_proj) goes straight into
`norm(x + residual)`. Unfused, a TP decode step runs three kernels there: the all-reduce, then the
fused add + RMSNorm reading its result. Fused, one kernel per call does it all:

    each program (one row of [T, hidden]):
      1. copy its row of this rank's partial sum into this rank's slot of a symmetric buffer
         (every rank has it mapped, CUDA IPC over NVLink)
      2. raise a flag in every peer's flag array (release, system scope), then wait for every
         peer's flag in its own (acquire; consumed back to 0)
      3. sum every rank's row in rank order (the same float32 sum on every rank: the ranks keep
         identical hidden states), round to the activation dtype, add the residual, normalise

Hazards, and why they hold:
- Buffer reuse: two slots, and consecutive calls use different ones (checked on the host at
  every call, and so at every CUDA-graph capture: a replay repeats the captured order). A rank
  writing slot s for call k + 2 has passed call k + 1's flags, which every peer raises only after
  finishing call k, its reads of slot s included; so no end-of-call barrier is needed.
- Co-residency: a program spins until its peers' programs of the same row arrive, so every
  program of a call must be resident at once: at most `max_rows` (<= 128) rows, one program each.
- A dead peer: the spin is bounded (`max_spins`); past it the program gives up, records the
  failure in `failed` and writes a wrong result. The TP watchdog fails the group.
- Symmetric memory is registered once per process group name (see fast_allreduce).

The kernel is engine.kernels.allreduce_add_rmsnorm. `ReferenceFusedNorm` is the same contract
built from the group's all-reduce and the torch add + RMSNorm: it runs anywhere (CPU tests
exercise the model-side plumbing with it). Which norms call these, with which slots, is decided
by a pass over the built model (engine.distributed.tp_pass); model files never see them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.distributed.parallel_state import FusedNorm
from engine.layers.norm import add_rmsnorm

log = logging.getLogger(__name__)

MAX_ROWS = 128  # every program of a call must be resident at once (132 SMs on H100 / H200)


def supported(world: int, hidden: int) -> bool:
    """Group sizes and row widths the CUDA kernel takes."""
    from engine.kernels.allreduce_add_rmsnorm import MAX_WORLD
    from engine.kernels.fused_add_rmsnorm import MAX_HIDDEN

    return 1 < world <= MAX_WORLD and 0 < hidden <= MAX_HIDDEN


class _SlotOrder:
    """The host-side check that consecutive calls alternate slots (see the module's hazards)."""

    def __init__(self) -> None:
        self.last: int | None = None

    def check(self, slot: int) -> None:
        if slot == self.last:
            raise RuntimeError(
                f"fused all-reduce + norm: two consecutive calls on slot {slot}; "
                "the norms that call it must alternate slots (tp_pass assigns them)"
            )
        self.last = slot


class _FusedNorm:
    """What both implementations share: the slot order."""

    def __init__(self) -> None:
        self._order = _SlotOrder()

    def reset_order(self) -> None:
        """After a self-test (its calls alternate slots too): the model's first call may use
        either slot."""
        self._order = _SlotOrder()


class ReferenceFusedNorm(_FusedNorm):
    """The fused contract from parts: `all_reduce` (the group's sum), then add + RMSNorm (any
    device)."""

    def __init__(
        self, all_reduce: Callable[[torch.Tensor], torch.Tensor], max_rows: int = MAX_ROWS
    ) -> None:
        super().__init__()
        self.all_reduce = all_reduce
        self.max_rows = max_rows

    def fits(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] <= self.max_rows

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._order.check(slot)
        return add_rmsnorm(self.all_reduce(x), residual, weight, eps)


class SymmMemFusedNorm(_FusedNorm):
    """Rank-local handle of the fused kernel: two slots of `max_rows` x `hidden` rows and their
    flags in one symmetric allocation, every rank's views of it, a failure flag.

    Set-up is collective (every rank, same order, after symmetric memory is enabled for the
    group)."""

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        hidden: int,
        dtype: torch.dtype,
        max_rows: int = MAX_ROWS,
    ) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        super().__init__()
        self.rank, self.world = group.rank(), group.size()
        if not supported(self.world, hidden):
            raise ValueError(
                f"fused all-reduce + norm: {self.world} ranks of {hidden}-wide rows unsupported"
            )
        self.hidden, self.dtype, self.max_rows = hidden, dtype, min(max_rows, MAX_ROWS)
        esize = torch.tensor([], dtype=dtype).element_size()
        self._slot_elems = self.max_rows * hidden
        self._flag_elems = self.max_rows * self.world
        data_bytes = 2 * self._slot_elems * esize
        total_bytes = data_bytes + 2 * self._flag_elems * 4
        self.buffer = symm_mem.empty(total_bytes, dtype=torch.uint8, device=device)
        self.buffer[data_bytes:].zero_()
        handle = symm_mem.rendezvous(self.buffer, group.group_name)
        self._data = [
            [handle.get_buffer(r, [self._slot_elems], dtype, s * self._slot_elems) for s in (0, 1)]
            for r in range(self.world)
        ]
        flag_offset = data_bytes // 4
        self._flags = [
            [
                handle.get_buffer(
                    r, [self._flag_elems], torch.int32, flag_offset + s * self._flag_elems
                )
                for s in (0, 1)
            ]
            for r in range(self.world)
        ]
        self.failed = torch.zeros(1, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone raises one

    def fits(self, x: torch.Tensor) -> bool:
        return (
            x.is_cuda
            and x.dim() == 2
            and x.shape[0] <= self.max_rows
            and x.shape[1] == self.hidden
            and x.dtype == self.dtype
            and x.is_contiguous()
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, slot: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.allreduce_add_rmsnorm import allreduce_add_rmsnorm

        self._order.check(slot)
        return allreduce_add_rmsnorm(
            x,
            residual,
            weight,
            eps,
            [d[slot] for d in self._data],
            [f[slot] for f in self._flags],
            self.failed,
            self.rank,
        )


def self_test(
    op: FusedNorm, rank: int, world: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Two calls (both slots) on known values against the unfused result, on this rank."""
    ok = True
    gen = torch.Generator(device=device).manual_seed(1234)
    for slot, rows in ((0, 3), (1, 1)):
        parts = [
            torch.randn(rows, hidden, generator=gen, device=device).to(dtype) for _ in range(world)
        ]
        residual = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
        weight = torch.rand(hidden, generator=gen, device=device).to(dtype) + 0.5
        total = torch.zeros(rows, hidden, dtype=torch.float32, device=device)
        for p in parts:
            total += p.float()
        want = add_rmsnorm(total.to(dtype), residual, weight, 1e-5)
        got = op(parts[rank], residual, weight, 1e-5, slot)
        torch.cuda.synchronize(device)
        ok &= all(
            torch.allclose(g.float(), w.float(), rtol=1e-2, atol=1e-2) for g, w in zip(got, want)
        )
    failed = getattr(op, "failed", None)
    return ok and (failed is None or int(failed.item()) == 0)
