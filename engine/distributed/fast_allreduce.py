"""How a TP group sums partial results, chosen once when the group is built: `choose_reduction`.

A decode step at batch 1 issues two all-reduces per layer of one row of `hidden` (8 KiB for
Llama-3-8B). NCCL's ring/tree machinery costs several microseconds of latency each; the
one-shot kernel (`torch.ops.symm_mem.one_shot_all_reduce_copy_out`) copies the local partial
sum into a buffer every rank has mapped (CUDA IPC over NVLink), meets its peers at a barrier
on signal pads, and reads and sums every rank's buffer directly: one kernel, no proxy thread,
and it is CUDA-graph safe (the barrier lives in device memory).

Messages above `max_bytes` (prefill) go to NCCL, which is bandwidth-optimal there. On top of
the one-shot kernel, FUSED / AUTO add the row-parallel all-reduce fused with the residual add
and RMSNorm (engine.distributed.fused_norm, applied to the model by engine.distributed.tp_pass):
on 2 x H200 at batch 1 it cut the all-reduce share of a decode step from 10.5% to 7.2%
(docs/BENCHMARKS.md).

`choose_reduction` is collective over the TP group: every rank allocates and rendezvouses the
buffers in the same order (engine.distributed.process_group.init_tp_group calls it on every
rank, before any model is built), runs a self-test against a known sum, and the ranks agree
(MIN over the group) on using it; a failure on any rank falls back to NCCL everywhere with a
warning, or raises `AllReduceUnavailableError` where the mode was asked for explicitly.
Symmetric memory serves only the first TP group a process builds (torch keeps the registration
per group name for the process's life).

Hazard: NVLink multicast stays off (`TORCH_SYMM_MEM_DISABLE_MULTICAST=1`, see ARCHITECTURE.md);
the one-shot kernel does not need it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.config import EngineConfig, ModelConfig, resolve_dtype
from engine.distributed import fused_norm
from engine.distributed.parallel_state import AllReduceMode, Reduction
from engine.errors import TandemError

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 << 20  # up to 128 rows of a 4096-wide hidden state in float32


class AllReduceUnavailableError(TandemError, RuntimeError):
    """`tp_all_reduce` asked for an implementation that some rank of the group cannot run."""


@dataclass(frozen=True)
class ReductionSpec:
    """What a group's reduction is chosen from: the asked-for mode and the rows it sums."""

    mode: AllReduceMode = AllReduceMode.AUTO
    hidden: int = 0  # row width of the fused all-reduce + norm
    dtype: torch.dtype = torch.float32  # activation dtype of those rows
    fp32_max_rows: int = 0  # EngineConfig.tp_fp32_reduce_max_tokens

    @classmethod
    def from_configs(cls, engine: EngineConfig, model: ModelConfig) -> ReductionSpec:
        return cls(
            AllReduceMode.parse(engine.tp_all_reduce),
            model.hidden_size,
            resolve_dtype(model.torch_dtype),
            engine.tp_fp32_reduce_max_tokens,
        )


PLAIN = ReductionSpec(AllReduceMode.NCCL)  # the process group's own all-reduce, nothing else


class SymmMemAllReduce:
    """Rank-local handle: a symmetric buffer of `max_bytes` and the group it is mapped in."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        self.group_name = group.group_name
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(self.group_name)
        self.max_bytes = max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.is_cuda and nbytes <= self.max_bytes and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        symm = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        out = torch.empty_like(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", self.group_name, out)


def choose_reduction(
    spec: ReductionSpec, group: dist.ProcessGroup, device: torch.device
) -> Reduction:
    """The reduction a group of more than one rank runs: AUTO resolved to a concrete mode.

    Collective: call on every rank of `group` in the same order, with the same `spec`.
    Raises AllReduceUnavailableError where SYMM_MEM or FUSED was asked for and some rank
    cannot run it."""
    fp32 = _fp32_max_rows(spec.fp32_max_rows, device)
    if spec.mode is AllReduceMode.SKIP:
        log.warning(
            "tp_all_reduce='skip': ranks do not sum partial results; outputs are wrong "
            "(measurement only)"
        )
        return Reduction(AllReduceMode.SKIP, "skip", fp32_max_rows=fp32)
    if device.type != "cuda":
        if spec.mode is AllReduceMode.FUSED:  # the reference composition: CPU tests of the pass
            op = fused_norm.ReferenceFusedNorm(_group_sum(group))
            return Reduction(
                AllReduceMode.FUSED, "fused-reference", fused_norm=op, fp32_max_rows=fp32
            )
        return Reduction(AllReduceMode.NCCL, "gloo", fp32_max_rows=fp32)
    return _cuda_reduction(spec, group, device, fp32)


def _cuda_reduction(
    spec: ReductionSpec, group: dist.ProcessGroup, device: torch.device, fp32: int
) -> Reduction:
    mode = spec.mode
    nccl = Reduction(AllReduceMode.NCCL, "nccl", fp32_max_rows=fp32)
    if mode is AllReduceMode.NCCL:
        return nccl
    fast = _symm_mem_all_reduce(group, device)
    if fast is None:
        _unless_required(mode, "symmetric memory is unavailable on some rank")
        return nccl
    symm = Reduction(AllReduceMode.SYMM_MEM, "symm_mem", fast=fast, fp32_max_rows=fp32)
    if mode is AllReduceMode.SYMM_MEM:
        return symm
    if mode is AllReduceMode.AUTO and not fused_norm.supported(group.size(), spec.hidden):
        return symm
    op = _symm_mem_fused_norm(group, device, spec.hidden, spec.dtype)
    if op is None:
        _unless_required(mode, "the fused all-reduce + norm failed its self-test on some rank")
        return symm
    return Reduction(AllReduceMode.FUSED, "fused", fast=fast, fused_norm=op, fp32_max_rows=fp32)


def _unless_required(mode: AllReduceMode, why: str) -> None:
    """Raise where `mode` was asked for explicitly; AUTO falls back instead."""
    if mode is not AllReduceMode.AUTO:
        raise AllReduceUnavailableError(f"tp_all_reduce={mode.value!r} was asked for but {why}")


def _group_sum(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=group)
        return x

    return all_reduce


def _all_ranks(group: dist.ProcessGroup, device: torch.device, ok: bool) -> bool:
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(int(flag.item()))


_REGISTERED: set[str] = set()  # group names this process enabled symmetric memory for


def _symm_mem_all_reduce(
    group: dist.ProcessGroup, device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES
) -> SymmMemAllReduce | None:
    """The one-shot all-reduce on every rank, or None on every rank."""
    # torch registers symmetric memory per group name for the life of the process, and a TP
    # group's name repeats when a process builds a second group (an engine restarted in the
    # same process): the stale registration would hang the rendezvous. Every rank first agrees
    # that none of them has registered this name before.
    if not _all_ranks(group, device, group.group_name not in _REGISTERED):
        log.warning(
            "symmetric memory already registered for this process group name in this "
            "process (a restarted TP group): using NCCL all-reduces"
        )
        return None
    fast: SymmMemAllReduce | None = None
    try:
        _REGISTERED.add(group.group_name)
        fast = SymmMemAllReduce(group, device, max_bytes)
        ok = _self_test(fast, group, device)
    except Exception as err:  # noqa: BLE001 - any failure means: use NCCL, on every rank
        log.warning("symmetric-memory all-reduce unavailable on rank %d: %s", group.rank(), err)
        ok = False
    return fast if _all_ranks(group, device, ok) else None


def _self_test(fast: SymmMemAllReduce, group: dist.ProcessGroup, device: torch.device) -> bool:
    rank, size = group.rank(), group.size()
    x = torch.full((3, 1000), float(rank + 1), dtype=torch.bfloat16, device=device)
    y = fast(x)
    torch.cuda.synchronize(device)
    return bool(torch.all(y == float(size * (size + 1) // 2)).item())


def _symm_mem_fused_norm(
    group: dist.ProcessGroup, device: torch.device, hidden: int, dtype: torch.dtype
) -> fused_norm.SymmMemFusedNorm | None:
    """The fused all-reduce + norm on every rank, or None on every rank."""
    op: fused_norm.SymmMemFusedNorm | None = None
    try:
        op = fused_norm.SymmMemFusedNorm(group, device, hidden, dtype)
        ok = fused_norm.self_test(op, group.rank(), group.size(), hidden, dtype, device)
    except Exception as err:  # noqa: BLE001 - any failure: every rank keeps the unfused path
        log.warning("fused all-reduce + norm unavailable on rank %d: %s", group.rank(), err)
        ok = False
    if not _all_ranks(group, device, ok):
        return None
    assert op is not None
    op.reset_order()
    return op


def _fp32_max_rows(max_rows: int, device: torch.device) -> int:
    """Row-parallel partial sums in float32 for steps of at most `max_rows` tokens (see
    EngineConfig.tp_fp32_reduce_max_tokens); the bound in effect: 0 when this torch build
    lacks CUDA's bf16 -> fp32 matmul (then every rank warns and rounds before the sum, as
    every rank runs the same torch)."""
    if max_rows == 0 or device.type != "cuda":
        return max_rows
    try:
        a = torch.ones(2, 8, dtype=torch.bfloat16, device=device)
        torch.mm(a, a.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError) as err:
        log.warning("float32 partial sums unavailable (%s): TP reduces in the model dtype", err)
        return 0
    return max_rows
