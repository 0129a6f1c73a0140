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
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.distributed.parallel_state import TPGroup, set_tp_group

logger = logging.getLogger(__name__)

TEARDOWN_WAIT_S = 10.0  # an abort or destroy that takes longer is left running in its thread
STEP_GROUP_TIMEOUT_S = 7 * 24 * 3600.0  # followers idle-wait here; fate-sharing ends them with the leader


def nccl_env(rank: int) -> dict[str, str]:
    """Environment every rank must have before NCCL initialises."""
    return {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2" if rank == 0 else "1"}


def host_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """The leader's rendezvous store on 127.0.0.1, on a port the OS picks (`store.port`)."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def init_tp_group(rank: int, size: int, port: int, device: torch.device, collective_timeout_s: float,
                  control_timeout_s: float, store: dist.TCPStore | None = None) -> TPGroup:
    """Join the local group of `size` ranks through the store on `port` and install it."""
    if device.type == "cuda":
        for key, value in nccl_env(rank).items():
            os.environ.setdefault(key, value)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False,
                              timeout=datetime.timedelta(seconds=control_timeout_s))
    if dist.is_initialized():
        raise RuntimeError("this process still holds a torch.distributed default group (an earlier TP "
                           "group's teardown did not finish); start the TP group in a new process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    device_id = device if device.type == "cuda" and device.index is not None else None  # eager NCCL init
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s), device_id=device_id)
    cpu_group = dist.new_group(list(range(size)), backend="gloo",
                               timeout=datetime.timedelta(seconds=STEP_GROUP_TIMEOUT_S))
    group = TPGroup(rank=rank, size=size, group=dist.group.WORLD, cpu_group=cpu_group,
                    control_timeout_s=control_timeout_s)
    set_tp_group(group)
    return group


def abort_groups() -> None:
    """Abort in-flight collectives (NCCL) and step-channel waits so a thread blocked on them
    returns; best effort."""
    from engine.distributed import shm_channel

    shm_channel.abort_all()
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is None or not dist.is_initialized():
        return
    _bounded(abort, "aborting the TP process group")


def destroy_tp_group() -> None:
    """Leave the group and restore the size-1 group (safe to call twice)."""
    set_tp_group(TPGroup())
    if dist.is_initialized():
        _bounded(dist.destroy_process_group, "destroying the TP process group")


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
        logger.warning("%s did not finish within %.0f s; left running in the background", what, wait_s)
        return False
    return True
