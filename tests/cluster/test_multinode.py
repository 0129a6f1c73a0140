"""`tandem launch` / `tandem down` on a simulated three-node Ray cluster on this machine: a head,
a prefill node (`tandem_prefill`) and a decode node (`tandem_decode`, room for a TP 2 group), CPU
only, every process on 127.0.0.1. The demo model serves end to end with KV moving between the
nodes over gRPC, from a TP = 1 prefill worker into a tensor_parallel_size 2 decode group."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml

from tandem.client import Client, TandemClientError
from tandem.launch import LaunchError, down, launch
from tandem.local_ray import LOOPBACK_SWITCH, bind_ray_to_loopback
from tandem.placement import PlacementError
from tandem.router_actor import ROUTER_ACTOR_NAME

NAMESPACE = "tandem-multinode-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_spec(path: Path, sd_file: Path, **ray_overrides: object) -> Path:
    engine = {"max_num_seqs": 8, "max_num_batched_tokens": 256, "block_size": 16}
    spec = {
        "version": 1,
        "model": {"path": "tiny-random", "dtype": "float32", "max_model_len": 256},
        "node_types": {
            "head": {"gpus": 0},
            "prefill_node": {"gpus": 0, "resource": "tandem_prefill"},
            "decode_node": {"gpus": 0, "resource": "tandem_decode"},
        },
        "pools": {
            "prefill": {
                "node_type": "prefill_node",
                "num_workers": 1,
                "device": "cpu",
                "engine": engine,
            },
            "decode": {
                "node_type": "decode_node",
                "num_workers": 1,
                "device": "cpu",
                "engine": engine,
                "tensor_parallel_size": 2,
            },
        },
        "kv": {
            "transport": "auto",
            "lease_s": 10,
            "grpc_port_base": 20000,
            "grpc_ports_per_node": 4,
        },
        "router": {"host": "127.0.0.1", "port": _free_port()},
        "metrics": {
            "host": "127.0.0.1",
            "port_base": 21000,
            "ports_per_node": 4,
            "service_discovery_file": str(sd_file),
        },
        "ray": {"namespace": NAMESPACE, "require_token_auth": False, **ray_overrides},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # another module's local instance: launch must join ours
        ray.shutdown()
    saved = os.environ.get(LOOPBACK_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    bind_ray_to_loopback()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    nodes = {"head": cluster.head_node}
    nodes["prefill"] = cluster.add_node(num_cpus=1, resources={"tandem_prefill": 1})
    nodes["decode"] = cluster.add_node(num_cpus=2, resources={"tandem_decode": 2})  # a TP 2 group
    cluster.wait_for_nodes()
    try:
        yield cluster, {role: node.node_id for role, node in nodes.items()}
    finally:
        ray.shutdown()
        cluster.shutdown()
        if saved[0] is None:
            os.environ.pop(LOOPBACK_SWITCH, None)
        else:
            os.environ[LOOPBACK_SWITCH] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def _offline_greedy(prompt: str, n: int) -> list[int]:
    from engine import LLM, SamplingParams

    llm = LLM("tiny-random", device="cpu", dtype="float32", show_progress=False)
    return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[
        0
    ].token_ids


def _tandem_actors() -> list[str]:
    import ray

    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE
    ]


def _live_groups() -> list[str]:
    import ray

    return [
        e["name"]
        for e in ray.util.placement_group_table().values()
        if e["name"].startswith("tandem-") and e["state"] != "REMOVED"
    ]


def test_spec_needing_token_auth_is_refused_on_an_open_cluster(ray_cluster, tmp_path):
    cluster, _ = ray_cluster
    spec = write_spec(tmp_path / "spec.yaml", tmp_path / "sd.json", require_token_auth=True)
    with pytest.raises(LaunchError) as err:
        launch(str(spec), cluster.address)
    assert err.value.field == "ray.require_token_auth"
    assert _tandem_actors() == [] and _live_groups() == []


def test_missing_node_resource_is_refused_before_anything_starts(ray_cluster, tmp_path):
    cluster, _ = ray_cluster
    spec_path = write_spec(tmp_path / "spec.yaml", tmp_path / "sd.json")
    spec = yaml.safe_load(spec_path.read_text())
    spec["node_types"]["decode_node"]["resource"] = "tandem_decode_big"
    spec_path.write_text(yaml.safe_dump(spec))
    with pytest.raises(PlacementError) as err:
        launch(str(spec_path), cluster.address)
    assert err.value.field == "node_types.decode_node.resource"
    assert _tandem_actors() == [] and _live_groups() == []


def test_launch_generate_down_across_nodes(ray_cluster, tmp_path):
    import ray

    cluster, node_ids = ray_cluster
    sd_file = tmp_path / "sd.json"
    spec = write_spec(tmp_path / "spec.yaml", sd_file)
    notes: list[str] = []
    result = launch(str(spec), cluster.address, timeout_s=180, say=notes.append)
    try:
        assert sorted(_tandem_actors()) == sorted(
            [ROUTER_ACTOR_NAME, "tandem-prefill-0-rank0", "tandem-decode-0-rank0"]
        )
        placed = {
            name: ray.get(ray.get_actor(name, namespace=NAMESPACE).node_id.remote(), timeout=30)
            for name in _tandem_actors()
        }
        assert placed == {
            ROUTER_ACTOR_NAME: node_ids["head"],
            "tandem-prefill-0-rank0": node_ids["prefill"],
            "tandem-decode-0-rank0": node_ids["decode"],
        }
        assert sorted(_live_groups()) == ["tandem-decode-0", "tandem-prefill-0"]
        decode = ray.get_actor("tandem-decode-0-rank0", namespace=NAMESPACE)
        ranks = ray.get(decode.rank_node_ids.remote(), timeout=30)
        assert (
            ranks == [node_ids["decode"]] * 2
        )  # the follower took bundle 1 of the launcher's group
        created = [e for e in ray.util.placement_group_table().values() if e["state"] == "CREATED"]
        assert len(created) == 2  # the launcher's two: rank 0 made none of its own

        with Client(result.endpoint, timeout=60) as client:
            assert client.health() == "SERVING"
            tokens, final = [], None
            for final in client.generate(
                "KV crosses nodes", temperature=0.0, max_tokens=12, ignore_eos=True
            ):
                tokens.extend(final.token_ids)
            assert len(tokens) == 12 and final.completion_tokens == 12
            assert tokens == _offline_greedy(
                "KV crosses nodes", 12
            )  # prefilled on TP 1, decoded on TP 2
            assert (
                final.timings.HasField("kv_transfer") and final.timings.prefill > 0
            )  # P -> D over gRPC (0 s: streamed, landed first)
            status = client.cluster_status()
            assert sorted((w.worker_id, w.pool) for w in status.workers) == [
                ("decode-0", "decode"),
                ("prefill-0", "prefill"),
            ]

        groups = {g["labels"]["tandem_role"]: g["targets"] for g in json.loads(sd_file.read_text())}
        assert set(groups) == {"router", "prefill", "decode"}
        assert all(t.startswith("127.0.0.1:") for targets in groups.values() for t in targets)
    finally:
        gone = down(str(spec), cluster.address)
    assert len(gone.actors) == 3 and sorted(gone.placement_groups) == [
        "tandem-decode-0",
        "tandem-prefill-0",
    ]
    assert _tandem_actors() == [] and _live_groups() == []
    assert json.loads(sd_file.read_text()) == []
    with pytest.raises(TandemClientError), Client(result.endpoint, timeout=5) as client:
        client.health()
    assert down(str(spec), cluster.address).actors == ()  # idempotent
