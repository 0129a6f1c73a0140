"""Small all-reduces for TP decode: a one-shot kernel over symmetric memory instead of NCCL.

A decode step at batch 1 issues two all-reduces per layer of one row of `hidden` (8 KiB for
Llama-3-8B). NCCL's ring/tree machinery costs several microseconds of latency each; the
one-shot kernel (`torch.ops.symm_mem.one_shot_all_reduce_copy_out`) copies the local partial
sum into a buffer every rank has mapped (CUDA IPC over NVLink), meets its peers at a barrier
on signal pads, and reads and sums every rank's buffer directly: one kernel, no proxy thread,
and it is CUDA-graph safe (the barrier lives in device memory).

Messages above `max_bytes` (prefill) go to NCCL, which is bandwidth-optimal there. On top of
the one-shot kernel, "fused" / "auto" install the row-parallel all-reduce fused with the
residual add and RMSNorm (engine.distributed.fused_norm): on 2 x H200 at batch 1 it cut the
all-reduce share of a decode step from 10.5% to 7.2% (docs/BENCHMARKS.md).

Set-up (`install`) is collective over the TP group: every rank allocates and rendezvouses the
buffer in the same order (ModelRunner calls it before building the model, on every rank), runs
a self-test against a known sum, and the ranks agree (NCCL MIN) on using it; any failure on any
rank falls back to NCCL everywhere with a warning. Symmetric memory serves only the first TP
group a process builds (torch keeps the registration per group name for the process's life).

Hazard: NVLink multicast stays off (`TORCH_SYMM_MEM_DISABLE_MULTICAST=1`, see ARCHITECTURE.md);
the one-shot kernel does not need it.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch
import torch.distributed as dist

from engine.distributed import fused_norm
from engine.distributed.parallel_state import TPGroup, get_tp_group, set_tp_group

log = logging.getLogger(__name__)

MODES = ("auto", "nccl", "symm_mem", "fused", "skip")
DEFAULT_MAX_BYTES = 2 << 20  # up to 128 rows of a 4096-wide hidden state in float32


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
        return x.is_cuda and x.numel() * x.element_size() <= self.max_bytes and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        symm = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        out = torch.empty_like(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", self.group_name, out)


def _self_test(fast: SymmMemAllReduce, tp: TPGroup, device: torch.device) -> bool:
    x = torch.full((3, 1000), float(tp.rank + 1), dtype=torch.bfloat16, device=device)
    y = fast(x)
    torch.cuda.synchronize(device)
    return bool(torch.all(y == float(tp.size * (tp.size + 1) // 2)).item())


_REGISTERED: set[str] = set()  # group names this process enabled symmetric memory for


def _all_ranks(tp: TPGroup, device: torch.device, ok: bool) -> bool:
    flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=tp.group)
    return bool(int(flag.item()))


def install(mode: str, device: torch.device, hidden: int = 0, dtype: torch.dtype = torch.float32,
            max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Give the process's TP group its all-reduce for `mode`; returns the mode in effect.

    "fused" (and "auto" where it can) also gives it the all-reduce fused with the residual add
    and RMSNorm for rows of `hidden` x `dtype` (engine.distributed.fused_norm): the symmetric-
    memory kernel on CUDA, the reference composition elsewhere ("fused-reference").
    Collective when the group has more than one rank: call on every rank in the same order."""
    tp = get_tp_group()
    if mode not in MODES:
        raise ValueError(f"tp_all_reduce: {mode!r} is not one of {MODES}")
    if tp.size == 1:
        return "none"
    if mode == "skip":
        log.warning("tp_all_reduce='skip': ranks do not sum partial results; outputs are wrong "
                    "(measurement only)")
        set_tp_group(dataclasses.replace(tp, skip_all_reduce=True))
        return "skip"
    if mode == "fused" and device.type != "cuda":
        set_tp_group(dataclasses.replace(tp, fused_norm=fused_norm.ReferenceFusedNorm(tp.all_reduce, fused_norm.MAX_ROWS)))
        return "fused-reference"
    if mode == "nccl" or device.type != "cuda":
        return "nccl" if device.type == "cuda" else "gloo"
    fast: SymmMemAllReduce | None = None
    # torch registers symmetric memory per group name for the life of the process, and a TP
    # group's name repeats when a process builds a second group (an engine restarted in the
    # same process): the stale registration would hang the rendezvous. Every rank first agrees
    # that none of them has registered this name before.
    ok = _all_ranks(tp, device, tp.group.group_name not in _REGISTERED)  # type: ignore[union-attr]
    if not ok:
        log.warning("symmetric memory already registered for this process group name in this process "
                    "(a restarted TP group): using NCCL all-reduces")
    else:
        try:
            _REGISTERED.add(tp.group.group_name)  # type: ignore[union-attr]
            fast = SymmMemAllReduce(tp.group, device, max_bytes)  # type: ignore[arg-type]
            ok = _self_test(fast, tp, device)
        except Exception as err:  # noqa: BLE001 - any failure means: use NCCL, on every rank
            log.warning("symmetric-memory all-reduce unavailable on rank %d: %s", tp.rank, err)
            ok = False
    if not _all_ranks(tp, device, ok):
        if mode in ("symm_mem", "fused"):
            raise RuntimeError(f"tp_all_reduce={mode!r} was asked for but symmetric memory is unavailable on some rank")
        return "nccl"
    set_tp_group(dataclasses.replace(tp, fast_all_reduce=fast))
    if mode == "symm_mem" or (mode == "auto" and not fused_norm.supported(tp.size, hidden)):
        return "symm_mem"
    return _install_fused(device, hidden, dtype, required=mode == "fused")


def _install_fused(device: torch.device, hidden: int, dtype: torch.dtype, required: bool) -> str:
    """The fused all-reduce + norm on every rank, or (not `required`) on none: "symm_mem"."""
    tp = get_tp_group()
    op: fused_norm.SymmMemFusedNorm | None = None
    try:
        op = fused_norm.SymmMemFusedNorm(tp.group, device, hidden, dtype, tp.all_reduce)  # type: ignore[arg-type]
        ok = fused_norm.self_test(op, tp.rank, tp.size, hidden, dtype, device)
    except Exception as err:  # noqa: BLE001 - any failure: every rank keeps the unfused path
        log.warning("fused all-reduce + norm unavailable on rank %d: %s", tp.rank, err)
        ok = False
    if not _all_ranks(tp, device, ok):
        if required:
            raise RuntimeError("tp_all_reduce='fused' was asked for but failed its self-test on some rank")
        return "symm_mem"
    assert op is not None
    op.reset_order()
    set_tp_group(dataclasses.replace(tp, fused_norm=op))
    return "fused"


def install_fp32_reduce(max_rows: int, device: torch.device) -> int:
    """Row-parallel partial sums in float32 for steps of at most `max_rows` tokens (see
    EngineConfig.tp_fp32_reduce_max_tokens); returns the bound in effect (0 when the group has
    one rank, or when this torch build lacks CUDA's bf16 -> fp32 matmul: then every rank
    warns and rounds before the sum, as every rank runs the same torch)."""
    tp = get_tp_group()
    if tp.size == 1 or max_rows == 0:
        return 0
    if device.type == "cuda":
        try:
            a = torch.ones(2, 8, dtype=torch.bfloat16, device=device)
            torch.mm(a, a.t(), out_dtype=torch.float32)
        except (RuntimeError, TypeError) as err:
            log.warning("float32 partial sums unavailable (%s): TP reduces in the model dtype", err)
            return 0
    set_tp_group(dataclasses.replace(tp, fp32_reduce_max_rows=max_rows))
    return max_rows
