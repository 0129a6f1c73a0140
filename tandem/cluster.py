"""A Tandem cluster on Ray: pool actors, adapters the router awaits, and the router itself.

`LocalCluster` is what `tandem serve`, `make demo` and the cluster tests run: a local Ray
instance (or the one this process joined), one actor per worker, and the asyncio gRPC router
in this process. Every server of ours binds 127.0.0.1 unless told otherwise.

A worker with `tensor_parallel_size > 1` gets a STRICT_PACK placement group of one bundle per
rank; its actor (rank 0) sits in bundle 0 and starts its followers in the others. `stop()`
removes the groups (the followers die with their rank 0).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer, HfTokenizer
from tandem.contract.worker_api import (
    CostModel,
    DecodeRequest,
    LoadSnapshot,
    PrefillRequest,
    PrefillResult,
    StepOutput,
)
from tandem.pool.router_watch import DEFAULT_ROUTER_TIMEOUT_S

PLACEMENT_TIMEOUT_S = 120.0  # a TP worker's group of bundles must be placed within this


class KVCapacity(NamedTuple):
    """A worker's KV cache as its engine reported it at start-up (HBM blocks)."""

    num_blocks: int
    block_size: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


class RayWorker:
    """A worker actor seen through tandem.contract.worker_api's async protocols (one method each)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        return await self.handle.prefill.remote(req)

    async def kv_handle(self, request_id: str) -> bytes:
        return await self.handle.kv_handle.remote(request_id)

    async def start(self, req: DecodeRequest) -> None:
        await self.handle.start.remote(req)

    async def submit(self, req: PrefillRequest) -> None:
        await self.handle.submit.remote(req)

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        return await self.handle.next_outputs.remote(max_wait_s)

    async def abort(self, request_id: str) -> None:
        await self.handle.abort.remote(request_id)

    async def load(self) -> LoadSnapshot:
        return await self.handle.load.remote()

    async def cost_model(self) -> CostModel:
        return await self.handle.cost_model.remote()


@dataclass(frozen=True)
class ClusterConfig:
    model: str = "tiny-random"  # tests and examples; `tandem serve` defaults to "demo"
    mode: str = "disaggregated"  # or "colocated"
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 1
    use_gpus: bool = False
    host: str = "127.0.0.1"
    port: int = 0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # pool -> engine kwargs over `engine_kwargs` for that pool's workers, e.g. a TP size per pool
    pool_engine_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibrate: bool = True
    lease_s: float = 30.0
    transfer_timeout_s: float = 30.0
    # every worker aborts what its router sent after this long without a call from it
    router_timeout_s: float = DEFAULT_ROUTER_TIMEOUT_S
    kv_transport: str = "grpc"  # or "p2p": torch.distributed send/recv (NCCL on GPUs, gloo on CPU)
    stream_kv: bool = (
        True  # decode receives a prompt's KV while it is prefilled (RouterConfig.stream_kv)
    )
    metrics_port: int | None = (
        0  # the router's metrics port (0: any free); None: no metrics anywhere
    )
    metrics_sd_path: str | None = (
        None  # Prometheus file-SD target list; None: service_discovery.default_sd_path()
    )
    # The router's API key (RouterConfig.api_key); None: no auth. Never in the repr.
    api_key: str | None = field(default=None, repr=False)
    # The router's OpenAI-compatible HTTP port (RouterConfig.http_port); None: no HTTP; 0: any
    http_port: int | None = None


def _actor_classes() -> dict[str, Any]:
    from tandem.actors import POOLS, worker_class

    return {pool: worker_class(pool) for pool in POOLS}


class LocalCluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.actors: dict[str, Any] = {}  # worker id -> actor handle
        self.pools: dict[str, str] = {}  # worker id -> pool
        self.server: RouterServer | None = None
        self.info: dict[str, Any] = {}
        self._kv_groups: dict[str, Any] = {}
        self._placement_groups: list[Any] = []  # one per TP > 1 worker
        self.metrics_targets: dict[str, str] = {}  # "router" or worker id -> "host:port"
        self.sd_path: str | None = None
        self.kv_capacity: dict[str, KVCapacity] = {}  # worker id -> its KV cache, once started

    def _plan_kv_groups(self, plan: list[tuple[str, str]]) -> None:
        """One torch.distributed group over every prefill and decode worker (p2p transport)."""
        c = self.config
        if c.kv_transport == "grpc" or c.mode == "colocated":
            return
        if c.kv_transport != "p2p":
            raise ValueError(f"kv_transport: {c.kv_transport!r} is not 'grpc' or 'p2p'")
        from kvtransfer.pool_link import KVGroupSpec, prefill_decode_peers

        port = _free_port(c.host)
        backend = "nccl" if c.use_gpus else "gloo"
        peers = prefill_decode_peers([pool for _, pool in plan])
        for rank, (worker_id, _) in enumerate(plan):
            self._kv_groups[worker_id] = KVGroupSpec(
                f"tcp://{c.host}:{port}", rank, len(plan), backend, peers=peers[rank]
            )

    def _plan(self) -> list[tuple[str, str]]:
        c = self.config
        if c.mode == "colocated":
            return [(f"colocated-{i}", "colocated") for i in range(c.num_colocated)]
        return [(f"prefill-{i}", "prefill") for i in range(c.num_prefill)] + [
            (f"decode-{i}", "decode") for i in range(c.num_decode)
        ]

    def _engine_kwargs(self, pool: str) -> dict[str, Any]:
        c = self.config
        return {"model": c.model, **c.engine_kwargs, **c.pool_engine_kwargs.get(pool, {})}

    def _tp_size(self, pool: str) -> int:
        return int(self._engine_kwargs(pool).get("tensor_parallel_size", 1))

    def _placement(self, pool: str) -> dict[str, Any]:
        """Ray options placing a worker of `pool`: bundle 0 of a new group at TP > 1."""
        size = self._tp_size(pool)
        if size == 1:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from engine.executor.ray_launch import placement_group

        pg = placement_group(size, self.config.use_gpus, PLACEMENT_TIMEOUT_S)
        self._placement_groups.append(pg)
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0
            )
        }

    def _spawn(self, worker_id: str, pool: str) -> Any:
        c = self.config
        kwargs: dict[str, Any] = {
            "worker_id": worker_id,
            "calibrate": c.calibrate,
            "engine_kwargs": self._engine_kwargs(pool),
            "router_timeout_s": c.router_timeout_s,
        }
        if pool == "prefill":
            kwargs |= {"host": c.host, "lease_s": c.lease_s}
        if pool == "decode":
            kwargs["transfer_timeout_s"] = c.transfer_timeout_s
        if pool in ("prefill", "decode") and self._kv_groups:
            kwargs["kv_group"] = self._kv_groups[worker_id]
        kwargs |= {"metrics_host": c.host, "metrics_port": None if c.metrics_port is None else 0}
        from tandem.actors import create_worker_actor  # shared with tandem.launch

        return create_worker_actor(
            pool,
            kwargs,
            name=f"tandem-{worker_id}",
            num_cpus=1,
            num_gpus=1 if c.use_gpus else 0,
            **self._placement(pool),
        )

    async def start(self) -> str:
        """Start the actors and the router; returns the router's address."""
        from engine.executor.ray_launch import ensure_ray

        ensure_ray()
        self._plan_kv_groups(self._plan())
        for worker_id, pool in self._plan():
            self.actors[worker_id] = self._spawn(worker_id, pool)
            self.pools[worker_id] = pool
        infos = await asyncio.gather(*(a.info.remote() for a in self.actors.values()))
        self.info = infos[0]
        loads = await asyncio.gather(*(a.load.remote() for a in self.actors.values()))
        self.kv_capacity = {
            w: KVCapacity(load.num_total_blocks, load.block_size)
            for w, load in zip(self.actors, loads)
        }
        self.server = RouterServer(self._router_config(), self._tokenizer())
        await self.server.start()
        targets = await asyncio.gather(*(a.metrics_address.remote() for a in self.actors.values()))
        for (worker_id, actor), target in zip(self.actors.items(), targets):
            await self.server.add_worker(worker_id, self.pools[worker_id], RayWorker(actor), target)
        self._write_service_discovery(dict(zip(self.actors, targets)))
        return self.server.address

    @property
    def http_address(self) -> str | None:
        """The HTTP API's base URL (`http://host:port`), once started with `http_port` set."""
        if self.server is None or self.config.http_port is None or not self.server.http_port:
            return None
        host = self.config.host
        host = f"[{host}]" if ":" in host else host  # an IPv6 literal
        return f"http://{host}:{self.server.http_port}"

    def _write_service_discovery(self, worker_targets: dict[str, str | None]) -> None:
        """Record every metrics target and write the Prometheus file-SD list (router first)."""
        from tandem.service_discovery import default_sd_path, target_groups, write_file_sd

        assert self.server is not None
        if self.server.metrics_endpoint is not None:
            self.metrics_targets["router"] = self.server.metrics_endpoint.target
        self.metrics_targets |= {w: t for w, t in worker_targets.items() if t}
        if not self.metrics_targets:
            return
        by_role: dict[str, list[str]] = {}
        for name, target in self.metrics_targets.items():
            by_role.setdefault(self.pools.get(name, "router"), []).append(target)
        path = self.config.metrics_sd_path or default_sd_path()
        self.sd_path = str(write_file_sd(path, target_groups(by_role)))

    def _router_config(self) -> RouterConfig:
        return RouterConfig(
            max_model_len=self.info["max_model_len"],
            model_name=self.config.model,
            vocab_size=self.info["vocab_size"],
            host=self.config.host,
            port=self.config.port,
            kv_salt=self.info["kv_salt"],
            metrics_port=self.config.metrics_port,
            stream_kv=self.config.stream_kv,
            api_key=self.config.api_key,
            http_port=self.config.http_port,
        )

    def _tokenizer(self) -> Any:
        try:
            return HfTokenizer(self.info["model_path"])
        except Exception:  # a shape-only preset has no tokenizer: token ids only
            return ByteTokenizer()

    async def kill_worker(self, worker_id: str) -> None:
        """Kill a worker for good (Ray does not restart it)."""
        import ray

        ray.kill(self.actors[worker_id], no_restart=True)

    async def crash_worker(self, worker_id: str) -> None:
        """Kill a worker's process as a crash would: Ray restarts it if its `max_restarts`
        allows (tandem.actors), and the router re-admits it once it heartbeats again."""
        import ray

        ray.kill(self.actors[worker_id], no_restart=False)

    async def stop(self) -> None:
        import ray

        if self.server is not None:
            await self.server.stop()
        for actor in self.actors.values():
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass
        self.actors.clear()
        for pg in self._placement_groups:
            with contextlib.suppress(Exception):  # Ray already shut down
                ray.util.remove_placement_group(pg)
        self._placement_groups.clear()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
