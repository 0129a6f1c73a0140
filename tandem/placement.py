"""The placement plan: which node hosts each TP group, what Ray bundles it asks for, which ports
each rank binds, and which KV transport each prefill -> decode pair uses. Pure: no Ray import.

`plan_cluster(spec, nodes)` is the whole contract. The lead feeds it `nodes_from_ray(ray.nodes())`
and then creates, per `WorkerPlan`, one STRICT_PACK placement group (`pinned_bundles()`, so Ray
puts the group on the node this plan chose and the KV transport choice stays true) and one actor
per rank. It raises `PlacementError` naming the spec field when the nodes cannot host the spec, so
nothing starts on a cluster that is too small.

Hazards: the plan reads free capacity from the node list it is given; resources taken by others
after the call (another job's actors) make Ray's placement group wait, not this function fail.
Workers are placed first-fit over nodes in a fixed order (non-head nodes first, by IP), so the
same cluster and spec always give the same plan.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from engine.errors import TandemError
from tandem.spec import NODE_IP, ClusterSpec, NodeTypeSpec, PoolRole, PoolSpec

STRATEGY = "STRICT_PACK"
HEAD_RESOURCE = "node:__internal_head__"  # the resource Ray gives only the head node
_PIN_AMOUNT = 0.001  # of the `node:<ip>` resource: pins a bundle to that node, takes nothing
_EPS = 1e-9
_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


class PlacementError(TandemError, ValueError):
    """The nodes cannot host the spec; `field` names the spec field to change (or `nodes`)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class KVTransport(str, Enum):
    NCCL = "nccl"
    GRPC = "grpc"


@dataclass(frozen=True)
class NodeInfo:
    """One live Ray node, as `ray.nodes()` describes it (see `nodes_from_ray`)."""

    node_id: str
    ip: str
    resources: Mapping[str, float]
    labels: Mapping[str, str]
    is_head: bool


@dataclass(frozen=True)
class WorkerPlan:
    """One pool member: a TP group whose ranks share one node and one placement group."""

    role: PoolRole
    index: int
    node_id: str
    node_ip: str
    device: str
    bundles: tuple[Mapping[str, float], ...]  # one per TP rank, rank order
    label_selector: Mapping[str, str]  # for Ray's `bundle_label_selector`, one copy per bundle
    metrics_ports: tuple[int, ...]  # one per rank
    kv_grpc_ports: tuple[int, ...]  # one per rank
    strategy: str = STRATEGY

    @property
    def name(self) -> str:
        return f"{self.role.value}-{self.index}"

    @property
    def tensor_parallel_size(self) -> int:
        return len(self.bundles)

    @property
    def placement_group_name(self) -> str:
        return f"tandem-{self.name}"

    def actor_name(self, rank: int) -> str:
        assert 0 <= rank < self.tensor_parallel_size, rank
        return f"tandem-{self.name}-rank{rank}"

    def pinned_bundles(self) -> list[dict[str, float]]:
        """The bundles plus a sliver of `node:<ip>`, so Ray can only place them on this node."""
        return [{**bundle, f"node:{self.node_ip}": _PIN_AMOUNT} for bundle in self.bundles]


@dataclass(frozen=True)
class RouterPlan:
    """The router runs on the head node and owns the client port."""

    node_id: str
    node_ip: str
    host: str
    port: int
    tls: bool
    metrics_port: int

    @property
    def endpoint(self) -> str:
        """`host:port` for clients: the head's IP when the router binds a wildcard address."""
        host = self.node_ip if self.host in _WILDCARDS else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class KVLink:
    prefill: str  # WorkerPlan.name
    decode: str
    transport: KVTransport


@dataclass(frozen=True)
class ClusterPlan:
    workers: tuple[WorkerPlan, ...]
    router: RouterPlan
    kv_links: tuple[KVLink, ...]
    metrics_host: str  # spec.metrics.host ("node_ip" means each node's own IP)
    namespace: str = "tandem"

    def workers_of(self, role: PoolRole) -> tuple[WorkerPlan, ...]:
        return tuple(w for w in self.workers if w.role == role)

    def transport(self, prefill: str, decode: str) -> KVTransport:
        """The transport between two workers by name; KeyError for a pair that is not a link."""
        for link in self.kv_links:
            if (link.prefill, link.decode) == (prefill, decode):
                return link.transport
        raise KeyError((prefill, decode))


def nodes_from_ray(ray_nodes: Iterable[Mapping[str, Any]]) -> list[NodeInfo]:
    """Live nodes from `ray.nodes()` entries (keys NodeID, Alive, NodeManagerAddress, Resources,
    Labels). The head is the node carrying Ray's `node:__internal_head__` resource."""
    nodes = []
    for entry in ray_nodes:
        if not entry.get("Alive", False):
            continue
        resources = {str(k): float(v) for k, v in (entry.get("Resources") or {}).items()}
        nodes.append(
            NodeInfo(
                node_id=str(entry["NodeID"]),
                ip=str(entry["NodeManagerAddress"]),
                resources=resources,
                labels={str(k): str(v) for k, v in (entry.get("Labels") or {}).items()},
                is_head=HEAD_RESOURCE in resources,
            )
        )
    return nodes


def choose_kv_transport(
    requested: str, prefill: WorkerPlan, decode: WorkerPlan, gpu_fabric: bool
) -> KVTransport:
    """NCCL where the two workers can share a communicator (both on CUDA, and the same node or a
    cluster flagged `kv.gpu_fabric`), gRPC otherwise; an explicit `kv.transport` wins."""
    if requested != "auto":
        return KVTransport(requested)
    if prefill.device != "cuda" or decode.device != "cuda":
        return KVTransport.GRPC
    if prefill.node_id == decode.node_id or gpu_fabric:
        return KVTransport.NCCL
    return KVTransport.GRPC


class _NodeBudget:
    """What is left on one node while planning: resources and the next free port slots."""

    def __init__(self, node: NodeInfo) -> None:
        self.node = node
        self.free = dict(node.resources)
        self.next_metrics_slot = 1 if node.is_head else 0  # slot 0 of the head: the router
        self.next_kv_slot = 0

    def can_host(self, demand: Mapping[str, float]) -> bool:
        return all(self.free.get(name, 0.0) + _EPS >= amount for name, amount in demand.items())

    def host(self, demand: Mapping[str, float]) -> None:
        assert self.can_host(demand), (self.node.node_id, demand)
        for name, amount in demand.items():
            self.free[name] -= amount

    def describe(self, names: Iterable[str]) -> str:
        parts = [
            f"{n} {self.free.get(n, 0.0):g}/{self.node.resources.get(n, 0.0):g}" for n in names
        ]
        return f"{self.node.ip} ({', '.join(parts)} free)"


def plan_cluster(spec: ClusterSpec, nodes: list[NodeInfo]) -> ClusterPlan:
    """Places every pool's TP groups, the router and the ports; raises `PlacementError`."""
    head = _head_of(nodes)
    budgets = [_NodeBudget(n) for n in sorted(nodes, key=_node_order)]
    workers: list[WorkerPlan] = []
    for role, pool in spec.pools.items():
        workers += _place_pool(spec, role, pool, budgets)
    router = RouterPlan(
        node_id=head.node_id,
        node_ip=head.ip,
        host=spec.router.host,
        port=spec.router.port,
        tls=spec.router.tls.enabled,
        metrics_port=spec.metrics.port_base,
    )
    links = _kv_links(spec, workers)
    return ClusterPlan(tuple(workers), router, links, spec.metrics.host, spec.ray.namespace)


def _head_of(nodes: list[NodeInfo]) -> NodeInfo:
    heads = [n for n in nodes if n.is_head]
    if len(heads) != 1:
        raise PlacementError("nodes", f"expected exactly one live head node, found {len(heads)}")
    return heads[0]


def _node_order(node: NodeInfo) -> tuple[bool, tuple[int, int | str], str]:
    try:
        address = ipaddress.ip_address(node.ip)
        ip_key: tuple[int, int | str] = (address.version, int(address))
    except ValueError:
        ip_key = (99, node.ip)
    return (node.is_head, ip_key, node.node_id)


def _rank_demand(node_type: NodeTypeSpec, pool: PoolSpec) -> dict[str, float]:
    """One TP rank's bundle: a GPU (on CUDA), its CPUs and one unit of the pool's resource."""
    bundle: dict[str, float] = {}
    if pool.device == "cuda":
        bundle["GPU"] = 1.0
    bundle["CPU"] = pool.cpus_per_rank
    if node_type.resource:
        bundle[node_type.resource] = 1.0
    return bundle


def _eligible(budget: _NodeBudget, node_type: NodeTypeSpec) -> bool:
    node = budget.node
    if node_type.resource and node.resources.get(node_type.resource, 0.0) <= 0.0:
        return False
    return all(node.labels.get(k) == v for k, v in node_type.labels.items())


def _place_pool(
    spec: ClusterSpec, role: PoolRole, pool: PoolSpec, budgets: list[_NodeBudget]
) -> list[WorkerPlan]:
    node_type = spec.node_type_of(pool)
    eligible = [b for b in budgets if _eligible(b, node_type)]
    if not eligible:
        raise _no_eligible_node(role, pool, node_type)
    bundle = _rank_demand(node_type, pool)
    tp = pool.tensor_parallel_size
    group = {name: amount * tp for name, amount in bundle.items()}
    placed = []
    for index in range(pool.num_workers):
        budget = next((b for b in eligible if b.can_host(group)), None)
        if budget is None:
            raise _not_enough_room(role, pool, index, group, eligible)
        budget.host(group)
        placed.append(_worker(spec, role, index, pool, node_type, bundle, budget))
    return placed


def _worker(
    spec: ClusterSpec,
    role: PoolRole,
    index: int,
    pool: PoolSpec,
    node_type: NodeTypeSpec,
    bundle: Mapping[str, float],
    budget: _NodeBudget,
) -> WorkerPlan:
    tp = pool.tensor_parallel_size
    return WorkerPlan(
        role=role,
        index=index,
        node_id=budget.node.node_id,
        node_ip=budget.node.ip,
        device=pool.device,
        bundles=tuple(dict(bundle) for _ in range(tp)),
        label_selector=dict(node_type.labels),
        metrics_ports=_take_metrics_ports(spec, budget, tp),
        kv_grpc_ports=_take_kv_ports(spec, budget, tp),
    )


def _take_metrics_ports(spec: ClusterSpec, budget: _NodeBudget, count: int) -> tuple[int, ...]:
    start, limit = budget.next_metrics_slot, spec.metrics.ports_per_node
    if start + count > limit:
        raise PlacementError(
            "metrics.ports_per_node",
            f"{limit} ports per node are too few for the processes placed on {budget.node.ip}",
        )
    budget.next_metrics_slot += count
    return tuple(spec.metrics.port_base + slot for slot in range(start, start + count))


def _take_kv_ports(spec: ClusterSpec, budget: _NodeBudget, count: int) -> tuple[int, ...]:
    start, limit = budget.next_kv_slot, spec.kv.grpc_ports_per_node
    if start + count > limit:
        raise PlacementError(
            "kv.grpc_ports_per_node",
            f"{limit} ports per node are too few for the ranks placed on {budget.node.ip}",
        )
    budget.next_kv_slot += count
    return tuple(spec.kv.grpc_port_base + slot for slot in range(start, start + count))


def _no_eligible_node(role: PoolRole, pool: PoolSpec, node_type: NodeTypeSpec) -> PlacementError:
    where = f"node_types.{pool.node_type}"
    if node_type.resource:
        hint = f"ray start ... --resources='{{\"{node_type.resource}\": <number of GPUs>}}'"
        return PlacementError(
            f"{where}.resource",
            f"no live node carries resource {node_type.resource!r} needed by pools.{role.value}; "
            f"start its nodes with {hint}",
        )
    if node_type.labels:
        return PlacementError(
            f"{where}.labels",
            f"no live node has labels {dict(node_type.labels)} needed by pools.{role.value}",
        )
    return PlacementError(f"pools.{role.value}", "the node list is empty")


def _not_enough_room(
    role: PoolRole,
    pool: PoolSpec,
    index: int,
    group: Mapping[str, float],
    eligible: list[_NodeBudget],
) -> PlacementError:
    need = ", ".join(f"{name} {amount:g}" for name, amount in group.items())
    have = "; ".join(b.describe(group) for b in eligible)
    return PlacementError(
        f"pools.{role.value}.num_workers",
        f"{pool.num_workers} workers do not fit: worker {index} needs {need} on one node and "
        f"no eligible node has that left ({have})",
    )


def _kv_links(spec: ClusterSpec, workers: list[WorkerPlan]) -> tuple[KVLink, ...]:
    prefills = [w for w in workers if w.role == PoolRole.PREFILL]
    decodes = [w for w in workers if w.role == PoolRole.DECODE]
    return tuple(
        KVLink(p.name, d.name, choose_kv_transport(spec.kv.transport, p, d, spec.kv.gpu_fabric))
        for p in prefills
        for d in decodes
    )


def prometheus_file_sd(plan: ClusterPlan) -> list[dict[str, Any]]:
    """The content of Prometheus' `file_sd_configs` file: one target group per role."""

    def address(ip: str, port: int) -> str:
        host = ip if plan.metrics_host == NODE_IP else plan.metrics_host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    router = plan.router
    groups = [
        {"targets": [address(router.node_ip, router.metrics_port)], "labels": _labels("router")}
    ]
    for role in PoolRole:
        targets = [
            address(w.node_ip, port) for w in plan.workers_of(role) for port in w.metrics_ports
        ]
        if targets:
            groups.append({"targets": targets, "labels": _labels(role.value)})
    return groups


def _labels(role: str) -> dict[str, str]:
    return {"job": "tandem", "tandem_role": role}
