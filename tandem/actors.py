"""Creating pool worker actors: the one place that maps a pool name to its actor class and sets
the options every worker actor shares. `LocalCluster` (tandem serve, make demo) and
`tandem.launch` (tandem launch) both create workers through `create_worker_actor`.

Shared options and why: `max_restarts=0` (a restarted worker would come back with an empty KV
cache while the router still believes its leases exist; the router marks it dead instead) and
`max_concurrency=1000` (the router long-polls `next_outputs` while submitting and aborting on
the same actor). Placement (CPUs, GPUs, placement group, name, lifetime) is the caller's.
"""

from __future__ import annotations

from typing import Any

POOLS = ("prefill", "decode", "colocated")
SHARED_OPTIONS: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1000}


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


def create_worker_actor(pool: str, kwargs: dict[str, Any], **options: Any) -> Any:
    """Start one worker actor of `pool` with constructor `kwargs`; returns its handle at once
    (the constructor runs remotely: await `info()` to know it loaded)."""
    import ray

    cls: Any = ray.remote(worker_class(pool))
    return cls.options(**SHARED_OPTIONS, **options).remote(**kwargs)
