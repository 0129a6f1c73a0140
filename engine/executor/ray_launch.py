"""Ray plumbing for a TP group: a local Ray instance when none is running, one STRICT_PACK
placement group per group (bundle r for rank r), one follower actor per rank >= 1.

The placement group is this module's own (`placement_group`, removed at teardown), or, for a
pool worker that a launcher already placed in bundle 0 of a group reserved for its ranks, that
group (`current_placement`: followers take bundles 1.. with exactly their resources; the
launcher owns and removes it).

Ray is used to start, stop and watch followers only; step traffic goes through
torch.distributed (engine.executor.step_channel).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.errors import EngineConfigError

NOSET_CUDA_VISIBLE_DEVICES = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
LOCAL_RAY_MIN_CPUS = 8  # followers reserve CPUs; small machines still need room for a few groups


def ensure_ray() -> None:
    """Use the Ray instance this process already joined, the one RAY_ADDRESS names, or start a
    local one. Workers must import `engine`: its root goes onto PYTHONPATH before Ray starts."""
    import ray

    if ray.is_initialized():
        return
    root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    # Ray's own INFO lines ("Started a local Ray instance.") are not the user's business;
    # its warnings and the workers' output still reach the terminal.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(include_dashboard=False, logging_level=logging.WARNING)
    else:
        num_cpus = max(LOCAL_RAY_MIN_CPUS, os.cpu_count() or 1)
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )


class GroupPlacement(NamedTuple):
    pg: Any
    bundles: list[dict[str, float]]  # bundles[r]: rank r's resources
    owned: bool  # created for this group: removed at teardown


def group_placement(
    size: int, use_gpu: bool, timeout_s: float, use_current: bool
) -> GroupPlacement:
    """Where the ranks go: the current placement group (`use_current` and there is one), else a
    new one. Raises EngineConfigError if the cluster or the current group cannot hold them."""
    current = current_placement(size, use_gpu) if use_current else None
    if current is not None:
        return current
    return GroupPlacement(
        placement_group(size, use_gpu, timeout_s), [_bundle(use_gpu)] * size, True
    )


def current_placement(size: int, use_gpu: bool) -> GroupPlacement | None:
    """The placement group this process (a Ray actor in bundle 0) runs in; None outside one."""
    from ray.util import get_current_placement_group

    pg = get_current_placement_group()
    if pg is None:
        return None
    bundles = [dict(b) for b in pg.bundle_specs]
    if len(bundles) < size or (use_gpu and any(b.get("GPU", 0.0) < 1.0 for b in bundles[:size])):
        raise EngineConfigError(
            f"tensor_parallel_size: {size} ranks{' (a GPU each)' if use_gpu else ''} do not fit the "
            f"placement group this worker runs in (bundles {bundles})"
        )
    return GroupPlacement(pg, bundles[:size], False)


def _bundle(use_gpu: bool) -> dict[str, float]:
    return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


def placement_group(size: int, use_gpu: bool, timeout_s: float) -> Any:
    """One bundle per rank on one node; raises EngineConfigError if the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group as make_pg

    pg = make_pg([_bundle(use_gpu) for _ in range(size)], strategy="STRICT_PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        what = f"{size} GPUs" if use_gpu else f"{size} CPUs"
        raise EngineConfigError(
            f"tensor_parallel_size: {size} ranks need {what} on one Ray node; none free within {timeout_s:.0f} s"
        )
    return pg


def spawn_follower(pg: Any, rank: int, bundle: dict[str, float], spec: Any) -> Any:
    """Rank `rank`'s actor in bundle `rank` of `pg`, asking for exactly `bundle` (less node pins)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from engine.executor.follower import TPFollower

    custom = {
        k: v for k, v in bundle.items() if k not in ("CPU", "GPU") and not k.startswith("node:")
    }
    cls = ray.remote(TPFollower)
    # A follower sees every GPU of its node and selects its own (follower_cuda_device): CUDA
    # IPC peers (the symmetric-memory all-reduce) must have distinct device indices, and Ray's
    # narrowing would make every rank's GPU "cuda:0".
    runtime_env = (
        {"env_vars": {NOSET_CUDA_VISIBLE_DEVICES: "1"}} if bundle.get("GPU", 0.0) else None
    )
    return cls.options(
        num_cpus=bundle.get("CPU", 0.0),
        num_gpus=bundle.get("GPU", 0.0),
        resources=custom,
        max_restarts=0,
        max_task_retries=0,
        runtime_env=runtime_env,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
    ).remote(spec)


def _visible_gpus() -> list[int]:
    """Ray's ids of this process's CUDA devices, in device-index order."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = torch.cuda.device_count()
    try:
        physical = [int(x) for x in visible.split(",")] if visible else list(range(count))
    except ValueError:  # UUIDs: assume Ray and this process number GPUs alike
        physical = list(range(count))
    return physical[:count]


def leader_cuda_device(follower_gpu_ids: list[int]) -> torch.device:
    """This process's first visible GPU that no follower holds (the driver is outside Ray's
    GPU accounting; its bundle 0 only reserves the count)."""
    physical = _visible_gpus()
    for index, gpu in enumerate(physical):
        if gpu not in follower_gpu_ids:
            return torch.device("cuda", index)
    raise EngineConfigError(
        f"tensor_parallel_size: every visible GPU {physical} is held by a follower"
    )


def follower_cuda_device(gpu_ids: list[int]) -> torch.device:
    """The device index of the GPU Ray gave this follower (spawned with every GPU visible).

    Hazard: a leader that is itself a Ray actor sees only its own GPU as "cuda:0"; if the
    follower's index is 0 as well, the symmetric-memory all-reduce refuses the pair at its
    self-test and the group uses NCCL (correct, slower)."""
    physical = _visible_gpus()
    if len(gpu_ids) != 1 or gpu_ids[0] not in physical:
        raise EngineConfigError(
            f"tensor_parallel_size: follower got GPUs {gpu_ids}, sees {physical}"
        )
    return torch.device("cuda", physical.index(gpu_ids[0]))


def kill_actors(actors: list[Any], pg: Any | None) -> None:
    """Kill `actors` and remove `pg` (None: not ours); never raises (failure paths, exit).
    Ray reports an actor dead before its process is gone: see `wait_exited`."""
    import ray

    for actor in actors:
        with contextlib.suppress(Exception):  # already dead
            ray.kill(actor, no_restart=True)
    if pg is not None:
        with contextlib.suppress(Exception):  # Ray already shut down
            ray.util.remove_placement_group(pg)


def this_node_id() -> str | None:
    """The Ray node this process runs on; None when Ray is not up."""
    import ray

    if not ray.is_initialized():
        return None
    return str(ray.get_runtime_context().get_node_id())


def wait_exited(pids: list[int], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` until no process in `pids` (of this host) runs; returns those
    still running. A killed follower's memory, device memory included, is free only then."""
    deadline = time.monotonic() + timeout_s
    running = [pid for pid in pids if _running(pid)]
    while running and time.monotonic() < deadline:
        time.sleep(0.01)
        running = [pid for pid in running if _running(pid)]
    return running


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie has exited: its parent only has to reap it)."""
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False
    try:  # no /proc (macOS): ask the kernel
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
