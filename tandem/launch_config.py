"""What `tandem launch` hands each process, derived from the spec and the placement plan. Pure:
no Ray calls, so every mapping here is unit-testable without a cluster.

- `worker_kwargs(spec, plan, worker, ...)`: the constructor arguments of one worker actor.
- `router_config(spec, plan, info, ...)`: the router's `RouterConfig`.
- `spec_api_key(spec)`: the router's API key, read from `router.api_key_file` / `api_key_env`.
- `kv_transport_notes(plan)`: one line per KV link whose planned transport is not what runs.

A TP > 1 worker's placement group (one bundle per rank, `WorkerPlan.pinned_bundles`) holds its
rank 0 actor in bundle 0; rank 0 starts its followers in the other bundles itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.errors import TandemError
from kvtransfer.pool_link import KVGroupSpec, prefill_decode_peers
from router.auth import ApiKeyError, load_api_key
from router.config import RouterConfig
from router.slo import DEFAULT_SLO_CLASSES, SloClass
from tandem.placement import ClusterPlan, KVTransport, WorkerPlan
from tandem.spec import NODE_IP, ClusterSpec, PoolRole


class LaunchError(TandemError, ValueError):
    """`tandem launch` / `tandem down` cannot proceed; `field` names the spec field (or
    "ray.address" / "pools.<role>" for cluster-side failures)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def pool_of(spec: ClusterSpec, role: PoolRole) -> Any:
    pool = {
        PoolRole.PREFILL: spec.pools.prefill,
        PoolRole.DECODE: spec.pools.decode,
        PoolRole.COLOCATED: spec.pools.colocated,
    }[role]
    assert pool is not None, role
    return pool


def metrics_host(spec: ClusterSpec, node_ip: str) -> str:
    return node_ip if spec.metrics.host == NODE_IP else spec.metrics.host


def kv_groups(
    plan: ClusterPlan, fixed_ports: bool, free_port: Callable[[], int]
) -> dict[str, KVGroupSpec]:
    """When every planned prefill -> decode link is NCCL: one torch.distributed group over all
    prefill and decode workers (KV moves by NCCL send/recv, gRPC carries the control messages).
    Its store lives in the first prefill worker, on that rank's planned KV port (or a free port
    when several nodes share an IP). Mixed plans fall back to gRPC everywhere (see the notes)."""
    links = plan.kv_links
    if not links or any(link.transport != KVTransport.NCCL for link in links):
        return {}
    members = [w for w in plan.workers if w.role in (PoolRole.PREFILL, PoolRole.DECODE)]
    store = members[0]
    port = store.kv_grpc_ports[0] if fixed_ports else free_port()
    address = f"tcp://{store.node_ip}:{port}"
    peers = prefill_decode_peers(
        ["prefill" if w.role == PoolRole.PREFILL else "decode" for w in members]
    )
    return {
        w.name: KVGroupSpec(address, rank, len(members), "nccl", peers=peers[rank])
        for rank, w in enumerate(members)
    }


def worker_kwargs(
    spec: ClusterSpec, worker: WorkerPlan, fixed_ports: bool, kv_group: KVGroupSpec | None = None
) -> dict[str, Any]:
    """Constructor kwargs of `worker`'s rank-0 actor. `fixed_ports=False` (several Ray nodes
    share one IP, as in tests): metrics bind any free port instead of the plan's."""
    pool = pool_of(spec, worker.role)
    kwargs: dict[str, Any] = {
        "worker_id": worker.name,
        "engine_kwargs": pool.engine_kwargs(spec.model),
        "metrics_host": metrics_host(spec, worker.node_ip),
        "metrics_port": worker.metrics_ports[0] if fixed_ports else 0,
    }
    if worker.role == PoolRole.PREFILL:
        kwargs |= {
            "host": worker.node_ip,
            "lease_s": spec.kv.lease_s,
        }  # KV server: reachable by decode
    if kv_group is not None:
        kwargs["kv_group"] = kv_group
    return kwargs


def actor_resources(worker: WorkerPlan) -> dict[str, Any]:
    """Ray options for rank 0: exactly its bundle (minus the node pin, which only placed it)."""
    bundle = dict(worker.bundles[0])
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {
        "num_cpus": bundle.get("CPU", 0.0),
        "num_gpus": bundle.get("GPU", 0.0),
        "resources": custom,
    }


def slo_classes(spec: ClusterSpec) -> dict[str, SloClass]:
    """The router's classes: its defaults (it needs "interactive") overridden by the spec's."""
    classes = dict(DEFAULT_SLO_CLASSES)
    for name, c in spec.slo_classes.items():
        ttft = None if c.ttft_ms is None else c.ttft_ms / 1e3
        tpot = None if c.tpot_ms is None else c.tpot_ms / 1e3
        known = DEFAULT_SLO_CLASSES.get(name)
        priority = known.priority if known else (20 if c.best_effort else 0)
        classes[name] = SloClass(name, ttft, tpot, c.best_effort, priority)
    return classes


def spec_api_key(spec: ClusterSpec) -> str | None:
    """The router's API key from the spec's file or variable, read here (where `tandem launch`
    runs); None: no auth. Raises LaunchError naming `router.api_key_file` / `router.api_key_env`.
    The key reaches the router actor inside its `RouterConfig` (a `start` call's argument)."""
    try:
        return load_api_key(None, spec.router.api_key_file, spec.router.api_key_env)
    except ApiKeyError as exc:
        raise LaunchError(f"router.{exc.option}", exc.reason) from None


def router_config(
    spec: ClusterSpec,
    plan: ClusterPlan,
    info: dict[str, Any],
    fixed_ports: bool,
    api_key: str | None = None,
) -> RouterConfig:
    return RouterConfig(
        max_model_len=int(info["max_model_len"]),
        model_name=spec.model.path,
        vocab_size=int(info["vocab_size"]),
        host=spec.router.host,
        port=spec.router.port,
        max_message_bytes=int(spec.router.max_message_bytes),
        slo_classes=slo_classes(spec),
        kv_salt=str(info["kv_salt"]),
        metrics_host=metrics_host(spec, plan.router.node_ip),
        metrics_port=plan.router.metrics_port if fixed_ports else 0,
        tls_cert_file=spec.router.tls.cert_file if spec.router.tls.enabled else None,
        tls_key_file=spec.router.tls.key_file if spec.router.tls.enabled else None,
        tls_client_ca_file=spec.router.tls.client_ca_file if spec.router.tls.enabled else None,
        api_key=api_key,
        http_port=spec.router.http_port,
    )


def kv_transport_notes(plan: ClusterPlan) -> list[str]:
    """A line per link whose planned transport is not the one that runs: a plan that mixes NCCL
    and gRPC links runs gRPC everywhere (one KV group per cluster today). A TP > 1 worker joins
    the KV group with its rank 0, which moves the whole group's KV (kvtransfer.tp_view)."""
    transports = {link.transport for link in plan.kv_links}
    if len(transports) < 2:
        return []
    return [
        f"KV {link.prefill} -> {link.decode}: the plan chose nccl, but other links need grpc and "
        "one cluster runs one KV transport today; using grpc"
        for link in plan.kv_links
        if link.transport == KVTransport.NCCL
    ]
