"""What every pool worker shares: an engine on its own thread, its KV cache view, its load
snapshot (the heartbeat), its cost model calibrated at start, and its Prometheus metrics served
on `metrics_host:metrics_port` (0: any free port; None: not served). Decode and colocated
workers import this too.

With `tensor_parallel_size > 1` the worker is rank 0 of a TP group: its followers take bundles
1.. of the placement group the launcher put this actor in (bundle 0), and its KV view is the
whole group's (kvtransfer.tp_view: every KV head, one TP = 1 layout to every transport)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.worker_stats import engine_load
from kvtransfer.cache_view import KVCacheView, TPLayout
from tandem.contract.metrics_http import MetricsEndpoint, serve_registry
from tandem.contract.worker_api import CostModel, LoadSnapshot
from tandem.pool.metrics import WorkerMetrics, WorkerSnapshot, engine_snapshot, tier_figures
from tandem.pool.router_watch import DEFAULT_ROUTER_TIMEOUT_S, RouterWatch

log = logging.getLogger(__name__)

# Transfer cost per KV byte the router should assume, by transport (seconds per byte).
_TRANSFER_S_PER_BYTE = {"grpc": 1 / 0.5e9, "nccl": 1 / 50e9, "fake": 0.0}
SNAPSHOT_TIMEOUT_S = 2.0  # a scrape waits at most this long for the engine thread


class WorkerCore:
    def __init__(
        self,
        worker_id: str,
        engine_kwargs: dict[str, Any],
        on_output: Callable[[RequestOutput], None],
        before_step: Callable[[], None] | None = None,
        has_work: Callable[[], bool] | None = None,
        transport: str = "grpc",
        calibrate: bool = True,
        pool: str = "prefill",
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
        on_router_lost: Callable[[], int] | None = None,
        router_timeout_s: float = DEFAULT_ROUTER_TIMEOUT_S,
    ) -> None:
        """`on_router_lost()` (engine thread): abort every request and held transfer, return
        how many; run when no router call came for `router_timeout_s` (tandem.pool.router_watch).
        None: no watch."""
        self.tier_store: Any = None  # a kvtransfer TieredStore once attach_tiers ran
        self.worker_id = worker_id
        self.incarnation = uuid.uuid4().hex  # new on every (re)start: LoadSnapshot.incarnation
        self.engine = _build_engine(EngineConfig(**engine_kwargs))
        self.view = _kv_view(self.engine)
        self.transport = transport
        self._on_output = on_output
        self.router_watch = (
            None
            if on_router_lost is None
            else RouterWatch(
                router_timeout_s, on_router_lost, lambda: self.engine.stats().num_free_blocks
            )
        )
        self._worker_before_step = before_step
        self.aengine = AsyncEngine(
            self.engine, on_output, self._before_step, has_work, calibrate_at_start=calibrate
        )
        self.metrics = WorkerMetrics(str(self.engine.config.model), worker_id, pool, self._snapshot)
        self.aengine.loop.on_step(self.metrics.on_step)
        self.metrics_endpoint: MetricsEndpoint | None = None
        if metrics_port is not None:
            self.metrics_endpoint = serve_registry(
                self.metrics.registry, metrics_host, metrics_port
            )

    def _before_step(self) -> None:
        if self._worker_before_step is not None:
            self._worker_before_step()
        if self.router_watch is not None:
            self.router_watch.check()

    def heard_router(self) -> None:
        """Any thread: the router called (`load`, `next_outputs`); resets the watch's clock."""
        if self.router_watch is not None:
            self.router_watch.heard()

    @property
    def metrics_address(self) -> str | None:
        """The Prometheus target ("host:port") of this worker, None when not served."""
        return None if self.metrics_endpoint is None else self.metrics_endpoint.target

    def _snapshot(self) -> WorkerSnapshot | None:
        """Engine figures for a scrape (any thread); None when the engine loop is down."""
        if not self.aengine.healthy:
            return None
        snap = self.aengine.loop.call(engine_snapshot).result(timeout=SNAPSHOT_TIMEOUT_S)
        if self.tier_store is None:
            return snap
        return WorkerSnapshot(
            snap.load, {**snap.tiers, **tier_figures(self.tier_store, self.view.block_size)}
        )

    def attach_tiers(self, cpu_bytes: int, swap: bool) -> Any:
        """A pinned CPU tier under this engine's HBM: the preemption swap space (`swap`), or a
        prefix cache that evicted blocks spill into. Returns the store (None when 0 bytes)."""
        if cpu_bytes <= 0:
            return None
        from kvtransfer.tiers.engine_cache import TieredEngineCache, TieredSwap
        from kvtransfer.tiers.store import TieredStore

        store = self.tier_store = TieredStore(self.view, model_salt=self.salt, cpu_bytes=cpu_bytes)
        if swap:
            self.engine.attach_preemption_swap(TieredSwap(store, self.view))
        else:
            self.engine.attach_external_cache(TieredEngineCache(store, self.view))
        return store

    def start(self) -> None:
        self.aengine.start()

    @property
    def salt(self) -> str:
        return self.engine.kv_manager.salt

    async def load(self) -> LoadSnapshot:
        if not self.aengine.healthy:
            return LoadSnapshot(healthy=False, incarnation=self.incarnation)
        load = await self.aengine.run(engine_load)
        return LoadSnapshot(
            num_queued_prefill_tokens=load.num_queued_prefill_tokens,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            block_size=load.block_size,
            healthy=True,
            tier_blocks={"hbm": load.num_total_blocks - load.num_free_blocks},
            incarnation=self.incarnation,
        )

    def info(self) -> dict[str, Any]:
        """What the router needs to know of the model this worker serves."""
        engine = self.engine
        return {
            "model_path": engine.model_path,
            "max_model_len": engine.max_model_len,
            "vocab_size": engine.vocab_size,
            "eos_token_ids": list(engine.model_config.eos_token_ids),
            "kv_salt": self.salt,
            "block_size": engine.config.block_size,
        }

    def counters(self) -> dict[str, int]:
        """Monotonic counters of this worker (for tests and metrics); `router_losses`: times
        its router watch found the router gone and aborted what it had sent."""
        watch = self.router_watch
        return {
            "engine_steps": self.aengine.loop.num_steps,
            "router_losses": 0 if watch is None else watch.num_losses,
        }

    def cost_model(self) -> CostModel:
        cal = self.aengine.calibration
        return CostModel(
            prefill_s_per_token=cal.prefill_s_per_token,
            prefill_s_per_request=cal.prefill_s,
            decode_step_s=cal.step_s,
            decode_step_s_per_seq=cal.step_s_per_seq,
            decode_step_s_per_context_token=cal.step_s_per_ctx_token,
            # What a transfer moves: every KV head (the view is the whole TP group's), KV dtype.
            kv_bytes_per_token=self.view.spec.bytes_per_token(),
            transfer_s_per_byte=_TRANSFER_S_PER_BYTE.get(self.transport, 0.0),
        )

    def shutdown(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        self.aengine.shutdown()
        self.engine.shutdown()


def _build_engine(config: EngineConfig) -> LLMEngine:
    if config.tensor_parallel_size == 1:
        return LLMEngine(config, show_progress=False)
    from engine.executor.executor import TPOptions

    return LLMEngine(
        config, show_progress=False, tp_options=TPOptions(use_current_placement_group=True)
    )


def _kv_view(engine: LLMEngine) -> KVCacheView:
    """Rank 0's cache at TP = 1; at TP > 1 a view of every rank's (whole-group collectives)."""
    num_kv_heads = engine.model_config.num_kv_heads
    if engine.tp is None:
        return KVCacheView(engine.runner.kv_cache, TPLayout(0, 1, num_kv_heads), engine.kv_spec)
    from kvtransfer.tp_view import TPGroupKVView

    return TPGroupKVView(
        engine.runner.kv_cache, engine.tp, engine.tp.size, num_kv_heads, engine.kv_spec
    )


class PoolWorker:
    """The actor methods every pool worker answers the same way, from its `core`."""

    core: WorkerCore

    async def load(self) -> LoadSnapshot:
        self.core.heard_router()
        return await self.core.load()

    async def cost_model(self) -> CostModel:
        return self.core.cost_model()

    async def ping(self) -> str:
        return self.core.worker_id

    async def node_id(self) -> str:
        """The id of the Ray node this actor runs on (for placement checks)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    async def rank_node_ids(self) -> list[str]:
        """The Ray node of every TP rank, rank order (placement checks)."""
        tp = self.core.engine.tp
        return [await self.node_id(), *(tp.follower_node_ids if tp is not None else [])]

    async def info(self) -> dict[str, Any]:
        return self.core.info()

    async def counters(self) -> dict[str, int]:
        return self.core.counters()

    async def metrics_address(self) -> str | None:
        """This worker's Prometheus target ("host:port"), None when metrics are off."""
        return self.core.metrics_address
