"""The cluster a goodput sweep runs against: one this process starts from a spec, or one serving.

`cluster_config(spec)` maps a `deploy/`-style cluster spec (tandem.spec) onto the
`LocalCluster` config that `tandem serve`, bench/serve.py and the cluster tests run: the model,
the pool sizes and each pool's engine settings; the router binds a free loopback port and no
metrics endpoints start (a benchmark's side effects stay in its process). The spec's Ray, router
and metrics sections are not used: the cluster runs on this machine's local Ray.

`started(spec_path)` starts that cluster and stops it (and its actors) on exit; the Ray instance
it started stays up for the next spec until `shutdown_ray()`. `external(address, devices)`
describes a cluster someone else serves, from its status. A spec with both a disaggregated and a
colocated pool is refused: one spec is one layout (`--compare` takes one of each).

Devices (the goodput divisor): workers x TP of every pool; GPUs on CUDA pools, CPU workers else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.goodput_metrics import GoodputInputError
from tandem.client import AsyncClient
from tandem.cluster import ClusterConfig, LocalCluster
from tandem.spec import ClusterSpec, PoolRole, PoolSpec, load_spec
from tandem.spec_errors import SpecError


@dataclass(frozen=True)
class ClusterInfo:
    """What the JSON records about a cluster. `mode`: "disaggregated" or "colocated"."""

    name: str
    mode: str
    device: str  # "cuda", "cpu" or "unknown" (an external cluster)
    num_devices: int
    model: str
    workers: dict[str, int]  # pool -> number of workers
    spec: str | None = None


def read_spec(path: str) -> ClusterSpec:
    """The validated spec; raises GoodputInputError('--spec') naming the bad field."""
    if not Path(path).is_file():
        raise GoodputInputError("--spec", f"{path}: no such file")
    try:
        spec = load_spec(path)
    except SpecError as exc:
        raise GoodputInputError("--spec", str(exc)) from None
    pools = spec.pools
    if pools.colocated is not None and pools.prefill is not None:
        raise GoodputInputError(
            "--spec", f"{path}: defines both disaggregated and colocated pools; give one per spec"
        )
    return spec


def spec_mode(spec: ClusterSpec) -> str:
    return "colocated" if spec.pools.colocated is not None else "disaggregated"


def spec_info(path: str, spec: ClusterSpec) -> ClusterInfo:
    pools = spec.pools.items()
    cuda = any(pool.device == "cuda" for _, pool in pools)
    return ClusterInfo(
        name=Path(path).stem,
        mode=spec_mode(spec),
        device="cuda" if cuda else "cpu",
        num_devices=sum(pool.num_workers * pool.tensor_parallel_size for _, pool in pools),
        model=spec.model.path,
        workers={role.value: pool.num_workers for role, pool in pools},
        spec=path,
    )


def cluster_config(spec: ClusterSpec) -> ClusterConfig:
    pools = dict(spec.pools.items())
    cuda = any(pool.device == "cuda" for pool in pools.values())
    nccl = spec.kv.transport == "nccl" or (spec.kv.transport == "auto" and cuda)
    colocated = pools.get(PoolRole.COLOCATED)
    prefill, decode = pools.get(PoolRole.PREFILL), pools.get(PoolRole.DECODE)
    return ClusterConfig(
        model=spec.model.path,
        mode=spec_mode(spec),
        num_prefill=prefill.num_workers if prefill else 1,
        num_decode=decode.num_workers if decode else 1,
        num_colocated=colocated.num_workers if colocated else 1,
        use_gpus=cuda,
        port=0,
        pool_engine_kwargs={role.value: _engine_kwargs(pool, spec) for role, pool in pools.items()},
        lease_s=spec.kv.lease_s,
        kv_transport="p2p" if nccl and colocated is None else "grpc",
        metrics_port=None,
    )


def _engine_kwargs(pool: PoolSpec, spec: ClusterSpec) -> dict[str, Any]:
    kwargs = pool.engine_kwargs(spec.model)
    return {k: v for k, v in kwargs.items() if v is not None}  # None: the engine's default


@asynccontextmanager
async def started(path: str) -> AsyncIterator[tuple[str, ClusterInfo, str | None]]:
    """Start the spec's cluster; yields (router address, its info, the model's checkpoint path)."""
    spec = read_spec(path)
    cluster = LocalCluster(cluster_config(spec))
    try:
        address = await cluster.start()
        yield address, spec_info(path, spec), cluster.info.get("model_path")
    finally:
        await cluster.stop()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


async def external(address: str, num_devices: int | None) -> ClusterInfo:
    """Describe a serving cluster from its status; `num_devices` None: one per worker."""
    client = AsyncClient(address, timeout=10)
    try:
        info, status = await client.model_info(), await client.cluster_status()
    finally:
        await client.close()
    workers: dict[str, int] = {}
    for w in status.workers:
        workers[w.pool] = workers.get(w.pool, 0) + 1
    if not workers:
        raise GoodputInputError("--address", f"{address}: the router reports no workers")
    return ClusterInfo(
        name="external",
        mode="colocated" if set(workers) == {"colocated"} else "disaggregated",
        device="unknown",
        num_devices=num_devices or sum(workers.values()),
        model=info.model,
        workers=workers,
    )
