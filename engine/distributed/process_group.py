"""Creating and tearing down the torch.distributed groups behind a TPGroup.

Local groups rendezvous through a TCPStore on 127.0.0.1 that rank 0 (the leader) hosts on a
free port. The model's collectives use NCCL on CUDA and gloo on CPU with `collective_timeout_s`;
a second gloo group with a long timeout carries step inputs, because followers legitimately wait
there for as long as the leader is idle (the leader bounds its own waits on it).

Hazards:
- NCCL: `TORCH_NCCL_ASYNC_ERROR_HANDLING` is set before the group exists. Followers use 1 (a
  timed-out collective tears the process down, which the leader sees as a dead actor); the leader
  uses 2 (communicators are aborted, the user's process lives and gets a TPGroupError).
- NCCL collectives replayed inside CUDA graphs are invisible to NCCL's watchdog: a peer that dies
  mid-replay leaves the kernel spinning. The leader's watchdog calls `abort_groups()` then.
- `NCCL_NVLS_ENABLE=0` stays set on multi-GPU hosts (see ARCHITECTURE.md).
- Aborting or destroying NCCL communicators after a peer died has been seen to block for good
  (2 x H200, torch 2.11). Both run in a daemon thread and are waited for at most
  `TEARDOWN_WAIT_S`: the caller gets its TPGroupError either way. A process whose teardown did
  not finish keeps the dead default group, so it cannot start another TP group (the error says
  so); a pool worker in that state reports itself unhealthy and is replaced.
- torch.distributed's default group is process-global, so a process hosts one TP group at a
  time: a new one starts only once the previous one is destroyed (`claim_default_group` says
  which of the reasons below holds when it is not).
"""

from __future__ import annotations

import datetime
import enum
import gc
import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.distributed import fast_allreduce
from engine.distributed.errors import TPGroupError
from engine.distributed.parallel_state import TPGroup, set_tp_group

logger = logging.getLogger(__name__)

TEARDOWN_WAIT_S = 10.0  # an abort or destroy that takes longer is left running in its thread
STEP_GROUP_TIMEOUT_S = (
    7 * 24 * 3600.0
)  # followers idle-wait here; fate-sharing ends them with the leader


class DefaultGroup(enum.Enum):
    """Who holds this process's torch.distributed default group, as far as this module knows."""

    FREE = "free"
    TP_GROUP = "tp_group"  # a TP group this module made and has not destroyed yet
    STUCK = "stuck"  # a TP group whose destroy did not return within TEARDOWN_WAIT_S


_default_group = DefaultGroup.FREE


def claim_default_group(rank: int) -> None:
    """Check that this process can host a new TP group; raise TPGroupError naming `rank` and
    the real reason if it cannot. Collects garbage first: an engine dropped without being
    closed releases its group from its finalizer, which may wait for a collection."""
    if dist.is_initialized():
        gc.collect()
    if not dist.is_initialized():
        return
    if _default_group is DefaultGroup.STUCK:
        why = (
            "the teardown of an earlier TP group in this process did not finish (its "
            "process group destroy hung); start the new group in a new process"
        )
    elif _default_group is DefaultGroup.TP_GROUP:
        why = (
            "an earlier TP group in this process is still open: close the LLM (or shut "
            "the engine down) that owns it before starting another"
        )
    else:
        why = (
            "this process already has a torch.distributed default group that Tandem did "
            "not make; a TP group needs the default group: run the engine in a process of "
            "its own"
        )
    raise TPGroupError(rank, f"cannot start: {why}")


def nccl_env(rank: int) -> dict[str, str]:
    """Environment every rank must have before NCCL initialises."""
    return {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2" if rank == 0 else "1"}


def host_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """The leader's rendezvous store on 127.0.0.1, on a port the OS picks (`store.port`)."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        world_size,
        is_master=True,
        wait_for_workers=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_tp_group(
    rank: int,
    size: int,
    port: int,
    device: torch.device,
    collective_timeout_s: float,
    control_timeout_s: float,
    store: dist.TCPStore | None = None,
    reduction: fast_allreduce.ReductionSpec = fast_allreduce.PLAIN,
) -> TPGroup:
    """Join the local group of `size` ranks through the store on `port` and install it, with
    the reduction `reduction` resolves to (collective: fast_allreduce.choose_reduction)."""
    global _default_group
    if device.type == "cuda":
        for key, value in nccl_env(rank).items():
            os.environ.setdefault(key, value)
    claim_default_group(rank)
    if store is None:
        store = dist.TCPStore(
            "127.0.0.1",
            port,
            size,
            is_master=False,
            timeout=datetime.timedelta(seconds=control_timeout_s),
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = (
        device if device.type == "cuda" and device.index is not None else None
    )  # eager NCCL init
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=size,
        timeout=datetime.timedelta(seconds=collective_timeout_s),
        device_id=device_id,
    )
    _default_group = DefaultGroup.TP_GROUP
    cpu_group = dist.new_group(
        list(range(size)), backend="gloo", timeout=datetime.timedelta(seconds=STEP_GROUP_TIMEOUT_S)
    )
    world = dist.group.WORLD
    assert world is not None
    group = TPGroup(
        rank=rank,
        size=size,
        group=world,
        cpu_group=cpu_group,
        control_timeout_s=control_timeout_s,
        reduction=fast_allreduce.choose_reduction(reduction, world, device),
    )
    set_tp_group(group)
    return group


def abort_groups() -> None:
    """Abort in-flight collectives (NCCL) so a thread blocked on them returns; best effort.
    (The step channel's waits are the executor's: `engine.executor.watchdog` aborts those.)"""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or not dist.is_initialized():
        return
    _bounded(abort, "aborting the TP process group")


def destroy_tp_group() -> None:
    """Leave the group and restore the size-1 group (safe to call twice). Destroying the
    default group destroys every group made from it (the CPU group) too."""
    global _default_group
    set_tp_group(TPGroup())
    if not dist.is_initialized():
        return
    done = _bounded(dist.destroy_process_group, "destroying the TP process group")
    _default_group = DefaultGroup.FREE if done and not dist.is_initialized() else DefaultGroup.STUCK


def _bounded(fn: Callable[[], object], what: str, wait_s: float = TEARDOWN_WAIT_S) -> bool:
    """Run `fn` in a daemon thread and wait at most `wait_s`; True if it returned in time.
    Failures are logged, never raised: these run on failure paths that raise their own error."""

    def run() -> None:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a failed group may refuse a clean teardown
            logger.warning("%s failed: %s", what, err)

    thread = threading.Thread(target=run, name=f"tp-teardown-{what.split()[0]}", daemon=True)
    thread.start()
    thread.join(wait_s)
    if thread.is_alive():
        logger.warning(
            "%s did not finish within %.0f s; left running in the background", what, wait_s
        )
        return False
    return True
