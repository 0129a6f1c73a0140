"""The placement plan, from a spec and synthetic node lists (no Ray)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.placement import (
    HEAD_RESOURCE,
    KVTransport,
    NodeInfo,
    PlacementError,
    WorkerPlan,
    choose_kv_transport,
    nodes_from_ray,
    plan_cluster,
    prometheus_file_sd,
)
from tandem.spec import ClusterSpec, PoolRole, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]


def _spec(**changes: Any) -> ClusterSpec:
    data = yaml.safe_load((REPO / "deploy" / "tandem.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_spec(data)


def _node(ip: str, gpus: int = 0, cpus: int = 96, head: bool = False, **extra: float) -> NodeInfo:
    resources = {"CPU": float(cpus), f"node:{ip}": 1.0, **extra}
    if gpus:
        resources["GPU"] = float(gpus)
    if head:
        resources[HEAD_RESOURCE] = 1.0
    return NodeInfo(f"id-{ip}", ip, resources, {}, head)


def _two_node_cluster() -> list[NodeInfo]:
    return [
        _node("10.0.0.3", gpus=8, tandem_decode=8),
        _node("10.0.0.1", cpus=8, head=True),
        _node("10.0.0.2", gpus=8, tandem_prefill=8),
    ]


def test_two_node_example_plan() -> None:
    spec = load_spec(REPO / "deploy" / "tandem.yaml")
    plan = plan_cluster(spec, _two_node_cluster())
    prefill, decode = plan.workers_of(PoolRole.PREFILL), plan.workers_of(PoolRole.DECODE)
    assert len(prefill) == 4 and len(decode) == 2
    assert {w.node_ip for w in prefill} == {"10.0.0.2"}
    assert {w.node_ip for w in decode} == {"10.0.0.3"}
    for worker in plan.workers:
        assert worker.strategy == "STRICT_PACK"
        pool = spec.pools.prefill if worker.role == PoolRole.PREFILL else spec.pools.decode
        assert pool is not None
        resource = spec.node_type_of(pool).resource
        assert worker.tensor_parallel_size == pool.tensor_parallel_size
        for bundle in worker.bundles:
            assert bundle == {"GPU": 1.0, "CPU": pool.cpus_per_rank, resource: 1.0}
    assert plan.router.node_ip == "10.0.0.1"
    assert plan.router.endpoint == "10.0.0.1:50051"  # router.host 0.0.0.0 -> the head's IP


def test_gpus_are_never_oversubscribed() -> None:
    spec = load_spec(REPO / "deploy" / "tandem.yaml")
    nodes = _two_node_cluster()
    plan = plan_cluster(spec, nodes)
    used: Counter[str] = Counter()
    for worker in plan.workers:
        used[worker.node_id] += sum(b.get("GPU", 0.0) for b in worker.bundles)
    for node in nodes:
        assert used[node.node_id] <= node.resources.get("GPU", 0.0)


def test_pinned_bundles_name_the_chosen_node() -> None:
    plan = plan_cluster(load_spec(REPO / "deploy" / "tandem.yaml"), _two_node_cluster())
    worker = plan.workers_of(PoolRole.DECODE)[0]
    pinned = worker.pinned_bundles()
    assert len(pinned) == worker.tensor_parallel_size
    assert all(0 < b[f"node:{worker.node_ip}"] < 1 for b in pinned)
    assert worker.bundles[0].get(f"node:{worker.node_ip}") is None  # the plain bundles stay plain


def test_names_are_unique() -> None:
    plan = plan_cluster(load_spec(REPO / "deploy" / "tandem.yaml"), _two_node_cluster())
    actors = [w.actor_name(r) for w in plan.workers for r in range(w.tensor_parallel_size)]
    groups = [w.placement_group_name for w in plan.workers]
    assert len(set(actors)) == len(actors) and len(set(groups)) == len(groups)


def test_ports_unique_per_node_and_inside_their_ranges() -> None:
    spec = load_spec(REPO / "deploy" / "tandem.yaml")
    plan = plan_cluster(spec, _two_node_cluster())
    by_node: dict[str, list[int]] = {plan.router.node_ip: [plan.router.metrics_port]}
    metrics = range(spec.metrics.port_base, spec.metrics.port_base + spec.metrics.ports_per_node)
    kv = range(spec.kv.grpc_port_base, spec.kv.grpc_port_base + spec.kv.grpc_ports_per_node)
    for w in plan.workers:
        assert all(p in metrics for p in w.metrics_ports)
        assert all(p in kv for p in w.kv_grpc_ports)
        by_node.setdefault(w.node_ip, []).extend(w.metrics_ports + w.kv_grpc_ports)
    for ports in by_node.values():
        assert len(ports) == len(set(ports)) and spec.router.port not in ports


def test_kv_transport_is_grpc_across_nodes_without_fabric() -> None:
    plan = plan_cluster(load_spec(REPO / "deploy" / "tandem.yaml"), _two_node_cluster())
    assert len(plan.kv_links) == 4 * 2
    assert {link.transport for link in plan.kv_links} == {KVTransport.GRPC}


def test_kv_transport_is_nccl_with_a_gpu_fabric() -> None:
    plan = plan_cluster(_spec(kv__gpu_fabric=True), _two_node_cluster())
    assert {link.transport for link in plan.kv_links} == {KVTransport.NCCL}


def test_kv_transport_is_nccl_on_one_node() -> None:
    # One 8-GPU node carrying both pools' resources: 1 prefill worker (TP 2) + 1 decode (TP 4).
    spec = _spec(pools__prefill__num_workers=1, pools__decode__num_workers=1)
    nodes = [_node("10.0.0.1", cpus=8, head=True)]
    nodes.append(_node("10.0.0.2", gpus=8, tandem_prefill=8, tandem_decode=8))
    plan = plan_cluster(spec, nodes)
    assert plan.transport("prefill-0", "decode-0") == KVTransport.NCCL


def test_explicit_transport_wins() -> None:
    plan = plan_cluster(_spec(kv__transport="nccl"), _two_node_cluster())
    assert {link.transport for link in plan.kv_links} == {KVTransport.NCCL}


def _worker(node_id: str, device: str = "cuda") -> WorkerPlan:
    return WorkerPlan(PoolRole.PREFILL, 0, node_id, "ip", device, ({"GPU": 1.0},), {}, (1,), (2,))


@pytest.mark.parametrize(
    ("requested", "same_node", "fabric", "device", "expected"),
    [
        ("auto", True, False, "cuda", KVTransport.NCCL),
        ("auto", False, False, "cuda", KVTransport.GRPC),
        ("auto", False, True, "cuda", KVTransport.NCCL),
        ("auto", True, False, "cpu", KVTransport.GRPC),
        ("grpc", True, True, "cuda", KVTransport.GRPC),
        ("nccl", False, False, "cuda", KVTransport.NCCL),
    ],
)
def test_choose_kv_transport(
    requested: str, same_node: bool, fabric: bool, device: str, expected: KVTransport
) -> None:
    src = _worker("a", device)
    dst = _worker("a" if same_node else "b")
    assert choose_kv_transport(requested, src, dst, fabric) == expected


def test_no_node_with_the_pool_resource() -> None:
    nodes = [_node("10.0.0.1", head=True), _node("10.0.0.2", gpus=8, tandem_prefill=8)]
    with pytest.raises(PlacementError) as info:
        plan_cluster(load_spec(REPO / "deploy" / "tandem.yaml"), nodes)
    assert info.value.field == "node_types.decode_gpu.resource"
    assert "tandem_decode" in str(info.value) and "ray start" in str(info.value)


def test_not_enough_nodes_with_the_pool_resource() -> None:
    spec = _spec(pools__decode__num_workers=3)  # 3 x TP 4 = 12 GPUs, one 8-GPU decode node
    with pytest.raises(PlacementError) as info:
        plan_cluster(spec, _two_node_cluster())
    assert info.value.field == "pools.decode.num_workers"
    assert "worker 2" in info.value.reason and "10.0.0.3" in info.value.reason


def test_second_decode_node_makes_room() -> None:
    spec = _spec(pools__decode__num_workers=3)
    nodes = _two_node_cluster() + [_node("10.0.0.4", gpus=8, tandem_decode=8)]
    plan = plan_cluster(spec, nodes)
    assert Counter(w.node_ip for w in plan.workers_of(PoolRole.DECODE)) == {
        "10.0.0.3": 2,
        "10.0.0.4": 1,
    }


def test_fewer_gpus_than_the_resource_claims() -> None:
    nodes = _two_node_cluster()
    nodes[0] = _node("10.0.0.3", gpus=2, tandem_decode=8)  # TP 4 cannot fit on 2 GPUs
    with pytest.raises(PlacementError) as info:
        plan_cluster(load_spec(REPO / "deploy" / "tandem.yaml"), nodes)
    assert info.value.field == "pools.decode.num_workers" and "GPU" in info.value.reason


def test_label_selected_node_type() -> None:
    data = yaml.safe_load((REPO / "deploy" / "tandem.yaml").read_text())
    data["node_types"]["decode_gpu"] = {"gpus": 8, "labels": {"tandem.io/pool": "decode"}}
    spec = parse_spec(data)
    decode_node = NodeInfo(
        "d", "10.0.0.3", {"CPU": 96.0, "GPU": 8.0}, {"tandem.io/pool": "decode"}, False
    )
    plain_gpu_node = NodeInfo("x", "10.0.0.9", {"CPU": 96.0, "GPU": 8.0}, {}, False)
    nodes = [_node("10.0.0.1", head=True), _node("10.0.0.2", gpus=8, tandem_prefill=8)]
    plan = plan_cluster(spec, nodes + [plain_gpu_node, decode_node])
    decode = plan.workers_of(PoolRole.DECODE)
    assert {w.node_id for w in decode} == {"d"}
    assert all(w.label_selector == {"tandem.io/pool": "decode"} for w in decode)
    assert decode[0].bundles[0] == {"GPU": 1.0, "CPU": 4.0}
    with pytest.raises(PlacementError) as info:
        plan_cluster(spec, nodes + [plain_gpu_node])
    assert info.value.field == "node_types.decode_gpu.labels"


def test_no_head_node() -> None:
    nodes = [n for n in _two_node_cluster() if not n.is_head]
    with pytest.raises(PlacementError) as info:
        plan_cluster(load_spec(REPO / "deploy" / "tandem.yaml"), nodes)
    assert info.value.field == "nodes"


def test_metrics_port_range_too_small() -> None:
    spec = _spec(metrics__ports_per_node=4)  # the prefill node runs 8 ranks
    with pytest.raises(PlacementError) as info:
        plan_cluster(spec, _two_node_cluster())
    assert info.value.field == "metrics.ports_per_node"


def test_local_cpu_spec_on_one_node() -> None:
    spec = load_spec(REPO / "deploy" / "tandem-local.yaml")
    plan = plan_cluster(spec, [_node("127.0.0.1", cpus=2, head=True)])
    assert [w.name for w in plan.workers] == ["decode-0", "prefill-0"]
    assert all("GPU" not in b for w in plan.workers for b in w.bundles)
    assert plan.transport("prefill-0", "decode-0") == KVTransport.GRPC  # as the spec asks
    assert plan.router.endpoint == "127.0.0.1:50051"


def test_local_cpu_spec_needs_its_cpus() -> None:
    spec = load_spec(REPO / "deploy" / "tandem-local.yaml")
    with pytest.raises(PlacementError):
        plan_cluster(spec, [_node("127.0.0.1", cpus=0, head=True)])


def test_nodes_from_ray_entries() -> None:
    entries: list[dict[str, Any]] = [
        {
            "NodeID": "aa",
            "Alive": True,
            "NodeManagerAddress": "10.0.0.1",
            "Resources": {"CPU": 8, HEAD_RESOURCE: 1, "node:10.0.0.1": 1},
            "Labels": {"ray.io/node-id": "aa"},
        },
        {"NodeID": "bb", "Alive": False, "NodeManagerAddress": "10.0.0.5", "Resources": {}},
        {
            "NodeID": "cc",
            "Alive": True,
            "NodeManagerAddress": "10.0.0.3",
            "Resources": {"CPU": 96, "GPU": 8, "tandem_decode": 8},
        },
    ]
    nodes = nodes_from_ray(entries)
    assert [(n.node_id, n.is_head) for n in nodes] == [("aa", True), ("cc", False)]
    assert nodes[1].resources["tandem_decode"] == 8.0 and nodes[1].labels == {}


def test_prometheus_file_sd_lists_every_process() -> None:
    spec = load_spec(REPO / "deploy" / "tandem.yaml")
    plan = plan_cluster(spec, _two_node_cluster())
    groups = prometheus_file_sd(plan)
    roles = {g["labels"]["tandem_role"]: g["targets"] for g in groups}
    assert roles["router"] == ["10.0.0.1:9400"]
    num_ranks = sum(w.tensor_parallel_size for w in plan.workers_of(PoolRole.DECODE))
    assert len(roles["decode"]) == num_ranks
    assert all(t.startswith("10.0.0.3:") for t in roles["decode"])
    assert all(g["labels"]["job"] == "tandem" for g in groups)


def test_head_doubles_as_the_prefill_node() -> None:
    """docs/deploy.md's two-node setup: node A is the head and the prefill node."""
    spec = load_spec(REPO / "deploy" / "tandem.yaml")
    nodes = [
        _node("10.0.0.1", gpus=8, head=True, tandem_prefill=8),
        _node("10.0.0.2", gpus=8, tandem_decode=8),
    ]
    plan = plan_cluster(spec, nodes)
    assert {w.node_ip for w in plan.workers_of(PoolRole.PREFILL)} == {"10.0.0.1"}
    assert plan.router.node_ip == "10.0.0.1"
    head_ports = [p for w in plan.workers_of(PoolRole.PREFILL) for p in w.metrics_ports]
    assert plan.router.metrics_port not in head_ports


def test_spec_and_placement_import_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tandem.spec, tandem.placement; "
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
