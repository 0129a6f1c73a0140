"""What `tandem launch` hands each process, from a spec and a plan (pure: no Ray)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tandem.launch_config import (
    actor_resources,
    kv_groups,
    kv_transport_notes,
    router_config,
    slo_classes,
    worker_kwargs,
)
from tandem.placement import KVTransport, NodeInfo, plan_cluster
from tandem.spec import PoolRole, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[2]
INFO = {"max_model_len": 4096, "vocab_size": 128256, "kv_salt": "salt"}


def _gpu_spec(**kv: object) -> dict:
    spec = yaml.safe_load((REPO / "deploy" / "tandem.yaml").read_text())
    for pool in ("prefill", "decode"):
        spec["pools"][pool]["tensor_parallel_size"] = 1
    spec["router"]["tls"]["enabled"] = False
    spec["kv"] |= kv
    return spec


def _nodes() -> list[NodeInfo]:
    head = NodeInfo("h", "10.0.0.1", {"CPU": 8, "node:__internal_head__": 1}, {}, True)
    prefill = NodeInfo("p", "10.0.0.2", {"CPU": 96, "GPU": 8, "tandem_prefill": 8}, {}, False)
    decode = NodeInfo("d", "10.0.0.3", {"CPU": 96, "GPU": 8, "tandem_decode": 8}, {}, False)
    return [head, prefill, decode]


def test_shipped_tensor_parallel_spec_places_each_group_on_its_pool_node():
    spec = load_spec(REPO / "deploy" / "tandem.yaml")  # prefill TP 2, decode TP 4
    plan = plan_cluster(spec, _nodes())
    for worker in plan.workers:
        pool = spec.pools.prefill if worker.role == PoolRole.PREFILL else spec.pools.decode
        assert pool is not None and worker.tensor_parallel_size == pool.tensor_parallel_size
        assert worker.node_ip == ("10.0.0.2" if worker.role == PoolRole.PREFILL else "10.0.0.3")
        assert all(
            b[f"node:{worker.node_ip}"] > 0 and b["GPU"] == 1.0 for b in worker.pinned_bundles()
        )
        assert (
            worker_kwargs(spec, worker, True)["engine_kwargs"]["tensor_parallel_size"]
            == pool.tensor_parallel_size
        )
        assert (
            actor_resources(worker)["num_gpus"] == 1.0
        )  # rank 0's bundle only: followers take the rest
    assert (
        kv_groups(plan, fixed_ports=True, free_port=lambda: 1) == {}
    )  # two nodes, no fabric: gRPC


def test_nccl_kv_between_tensor_parallel_workers_joins_their_rank_0s():
    spec = _gpu_spec(gpu_fabric=True)
    spec["pools"]["decode"]["tensor_parallel_size"] = 2
    plan = plan_cluster(parse_spec(spec), _nodes())
    assert {link.transport for link in plan.kv_links} == {KVTransport.NCCL}  # auto chose it
    groups = kv_groups(plan, fixed_ports=True, free_port=lambda: 1)
    kv_workers = [w for w in plan.workers if w.role in (PoolRole.PREFILL, PoolRole.DECODE)]
    assert sorted(groups) == sorted(w.name for w in kv_workers)  # one member per TP group
    assert sorted(g.rank for g in groups.values()) == list(range(len(kv_workers)))
    assert {g.world_size for g in groups.values()} == {len(kv_workers)}
    for w in kv_workers:  # pair communicators only across the two pools
        other = PoolRole.DECODE if w.role == PoolRole.PREFILL else PoolRole.PREFILL
        assert groups[w.name].peers == tuple(
            groups[v.name].rank for v in kv_workers if v.role == other
        )
    assert kv_transport_notes(plan) == []


def test_tls_settings_reach_the_router():
    spec = _gpu_spec()
    spec["router"]["tls"] |= {"enabled": True, "cert_file": "/tls/c.crt", "key_file": "/tls/c.key"}
    parsed = parse_spec(spec)
    config = router_config(parsed, plan_cluster(parsed, _nodes()), INFO, fixed_ports=True)
    assert (config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file) == (
        "/tls/c.crt",
        "/tls/c.key",
        None,
    )


def test_worker_kwargs_follow_the_plan():
    spec = parse_spec(_gpu_spec())
    plan = plan_cluster(spec, _nodes())
    prefill = plan.workers_of(PoolRole.PREFILL)[0]
    kwargs = worker_kwargs(spec, prefill, fixed_ports=True)
    assert kwargs["worker_id"] == "prefill-0" and kwargs["host"] == "10.0.0.2"
    assert (
        kwargs["metrics_host"] == "10.0.0.2" and kwargs["metrics_port"] == prefill.metrics_ports[0]
    )
    assert kwargs["engine_kwargs"]["model"] == spec.model.path
    assert kwargs["engine_kwargs"]["max_num_seqs"] == spec.pools.prefill.engine.max_num_seqs
    assert worker_kwargs(spec, prefill, fixed_ports=False)["metrics_port"] == 0
    decode = plan.workers_of(PoolRole.DECODE)[0]
    assert "host" not in worker_kwargs(spec, decode, fixed_ports=True)
    assert actor_resources(decode) == {
        "num_cpus": 4.0,
        "num_gpus": 1.0,
        "resources": {"tandem_decode": 1.0},
    }


def test_all_nccl_links_form_one_kv_group():
    plan = plan_cluster(parse_spec(_gpu_spec(gpu_fabric=True)), _nodes())
    assert {link.transport for link in plan.kv_links} == {KVTransport.NCCL}
    assert kv_transport_notes(plan) == []
    groups = kv_groups(plan, fixed_ports=True, free_port=lambda: 1)
    members = [w for w in plan.workers if w.role in (PoolRole.PREFILL, PoolRole.DECODE)]
    store = members[0]
    assert [groups[w.name].rank for w in members] == list(range(len(members)))
    assert {g.init_method for g in groups.values()} == {
        f"tcp://{store.node_ip}:{store.kv_grpc_ports[0]}"
    }
    assert all(g.world_size == len(members) and g.backend == "nccl" for g in groups.values())
    spec = parse_spec(_gpu_spec(gpu_fabric=True))
    assert (
        worker_kwargs(spec, members[-1], True, groups[members[-1].name])["kv_group"]
        == groups[members[-1].name]
    )
    assert kv_groups(plan, fixed_ports=False, free_port=lambda: 4321)[
        store.name
    ].init_method.endswith(":4321")


def test_grpc_links_make_no_kv_group():
    plan = plan_cluster(parse_spec(_gpu_spec()), _nodes())
    assert {link.transport for link in plan.kv_links} == {KVTransport.GRPC}
    assert (
        kv_groups(plan, fixed_ports=True, free_port=lambda: 1) == {}
        and kv_transport_notes(plan) == []
    )


def test_router_config_carries_spec_slo_classes_and_ports():
    spec = parse_spec(_gpu_spec())
    plan = plan_cluster(spec, _nodes())
    info = {"max_model_len": 8192, "vocab_size": 128256, "kv_salt": "salt"}
    config = router_config(spec, plan, info, fixed_ports=True)
    assert (config.host, config.port, config.metrics_host, config.metrics_port) == (
        "0.0.0.0",
        50051,
        "10.0.0.1",
        9400,
    )
    assert (
        config.slo_classes["interactive"].ttft_s == 0.5
        and config.slo_classes["standard"].tpot_s == 0.1
    )
    assert config.slo_classes["batch"].best_effort and set(slo_classes(spec)) >= {
        "interactive",
        "best_effort",
    }
