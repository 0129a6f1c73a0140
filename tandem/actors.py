"""Creating pool worker actors: the one place that maps a pool name to its actor class and sets
the options every worker actor shares. `LocalCluster` (tandem serve, make demo) and
`tandem.launch` (tandem launch) both create workers through `create_worker_actor`.

Shared options and why: `max_concurrency=1000` (the router long-polls `next_outputs` while
submitting and aborting on the same actor) and `max_task_retries=0`: a call in flight when the
worker died FAILS (the router answers its request UNAVAILABLE); replaying it on a restarted
worker would run half a request against an empty KV cache.

`max_restarts` (default `DEFAULT_MAX_RESTARTS`): Ray restarts a worker that died, and the new
process reloads its model. That is safe because the router does not trust the old process's
state on it: every snapshot carries the process's `incarnation` token, and a new one makes the
registry fail what was in flight there and drop every booking before re-admitting the worker
(router.registry, Restarts). Hazard: a worker that cannot rejoin as it was started is never
restarted by default (`restarts_allowed`): a member of a torch.distributed KV group (its peers
would wait on a rank that left) and a TP group's rank 0 (its followers and their bundles).
Placement (CPUs, GPUs, placement group, name, lifetime) is the caller's.
"""

from __future__ import annotations

from typing import Any

POOLS = ("prefill", "decode", "colocated")
DEFAULT_MAX_RESTARTS = 3
SHARED_OPTIONS: dict[str, Any] = {"max_task_retries": 0, "max_concurrency": 1000}


def worker_class(pool: str) -> type:
    """The plain (undecorated) worker class of a pool; KeyError names the pool."""
    if pool == "prefill":
        from prefill_worker.worker import PrefillWorker

        return PrefillWorker
    if pool == "decode":
        from decode_worker.worker import DecodeWorker

        return DecodeWorker
    if pool == "colocated":
        from tandem.pool.colocated import ColocatedWorker

        return ColocatedWorker
    raise KeyError(f"pool: {pool!r} is not one of {POOLS}")


def restarts_allowed(kwargs: dict[str, Any]) -> bool:
    """Whether a worker built from constructor `kwargs` may be restarted (module docstring)."""
    tp_size = int(kwargs.get("engine_kwargs", {}).get("tensor_parallel_size", 1))
    return kwargs.get("kv_group") is None and tp_size == 1


def create_worker_actor(
    pool: str,
    kwargs: dict[str, Any],
    max_restarts: int | None = None,
    **options: Any,
) -> Any:
    """Start one worker actor of `pool` with constructor `kwargs`; returns its handle at once
    (the constructor runs remotely: await `info()` to know it loaded). Ray restarts it up to
    `max_restarts` times (-1: forever) with the same `kwargs`; None: `DEFAULT_MAX_RESTARTS`
    where `restarts_allowed`, else 0 (module docstring)."""
    import ray

    if max_restarts is None:
        max_restarts = DEFAULT_MAX_RESTARTS if restarts_allowed(kwargs) else 0
    if max_restarts < -1:
        raise ValueError(f"max_restarts: {max_restarts} is not -1 (forever) or >= 0")
    cls: Any = ray.remote(worker_class(pool))
    return cls.options(**SHARED_OPTIONS, max_restarts=max_restarts, **options).remote(**kwargs)
