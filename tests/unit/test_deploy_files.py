"""Every file under deploy/ parses; the Ray and KubeRay files have the expected shape; and the
security defaults hold in the files as shipped: token auth on, the dashboard on 127.0.0.1, only
the client port in a Service, metrics ports in no Service, no secret written down."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.spec import ClusterSpec, parse_spec

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALL_YAML = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
KUBERAY = DEPLOY / "kuberay"
RAY_PORTS = {6379, 8265, 10001, 8080, 52365}  # GCS, dashboard, Ray client, Ray metrics, agent


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in _docs(path)]


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _kuberay_docs() if d.get("kind") == kind]


def _cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster spec of raycluster.yaml and the one inside rayjob.yaml."""
    specs = [d["spec"] for d in _of_kind("RayCluster")]
    specs += [d["spec"]["rayClusterSpec"] for d in _of_kind("RayJob")]
    return specs


def _k8s_tandem_spec() -> ClusterSpec:
    (config_map,) = [d for d in _of_kind("ConfigMap") if d["metadata"]["name"] == "tandem-spec"]
    return parse_spec(yaml.safe_load(config_map["data"]["tandem.yaml"]), "ConfigMap tandem-spec")


def _cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray" / "cluster.yaml").read_text())


def _ray_start_args(commands: list[str]) -> list[list[str]]:
    """The argument lists of every `ray start` in a launcher command list."""
    found = []
    for command in commands:
        for part in command.split(";"):
            words = shlex.split(part)
            if "ray" in words and "start" in words:
                found.append(words)
    return found


def test_deploy_has_the_expected_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in ALL_YAML}
    expected = {"tandem.yaml", "tandem-local.yaml", "ray/cluster.yaml", "kuberay/raycluster.yaml"}
    assert expected | {"kuberay/rayjob.yaml", "kuberay/common.yaml"} <= names


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_parses(path: Path) -> None:
    assert _docs(path), f"{path} holds no YAML document"


# --- Ray cluster launcher -------------------------------------------------------------------


def test_cluster_yaml_structure() -> None:
    config = _cluster_yaml()
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in config, key
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    for name, resource in (("prefill_gpu", "tandem_prefill"), ("decode_gpu", "tandem_decode")):
        resources = types[name]["resources"]
        assert resources["GPU"] >= 1 and resources[resource] == resources["GPU"], name
    assert any("pip install" in c and "tandem" in c for c in config["setup_commands"])
    assert _ray_start_args(config["worker_start_ray_commands"]), "no worker ray start"


def test_cluster_yaml_resources_match_the_spec() -> None:
    """The node types the spec asks for exist in the launcher config with the same resource."""
    spec = parse_spec(yaml.safe_load((DEPLOY / "tandem.yaml").read_text()))
    types = _cluster_yaml()["available_node_types"]
    for _, pool in spec.pools.items():
        node_type = spec.node_type_of(pool)
        assert types[pool.node_type]["resources"][node_type.resource] == node_type.gpus


def test_cluster_yaml_dashboard_on_loopback_and_token_auth() -> None:
    config = _cluster_yaml()
    (head,) = _ray_start_args(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert not any("0.0.0.0" in word for word in head)
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if _ray_start_args([command]):
            assert "RAY_AUTH_MODE=token" in command.split(), command


def test_cluster_yaml_token_is_a_file_not_a_value() -> None:
    config = _cluster_yaml()
    assert "~/.ray/auth_token" in config["file_mounts"]
    text = (DEPLOY / "ray" / "cluster.yaml").read_text()
    assert not re.search(r"RAY_AUTH_TOKEN\s*=", text)


# --- KubeRay --------------------------------------------------------------------------------


def test_kuberay_documents_are_well_formed() -> None:
    docs = _kuberay_docs()
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayJob", "ConfigMap", "Service"} <= kinds
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), doc.get("kind")
    for spec in _cluster_specs():
        assert spec["headGroupSpec"]["template"]["spec"]["containers"]
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"prefill-gpu", "decode-gpu"}


def test_kuberay_spec_configmap_validates_and_matches_the_cluster() -> None:
    spec = _k8s_tandem_spec()
    for cluster in _cluster_specs():
        declared: dict[str, float] = {}
        for group in cluster["workerGroupSpecs"]:
            declared.update(yaml.safe_load(yaml.safe_load(group["rayStartParams"]["resources"])))
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1
        for _, pool in spec.pools.items():
            node_type = spec.node_type_of(pool)
            assert declared[node_type.resource] == node_type.gpus


def test_rayjob_runs_tandem_launch_with_the_mounted_spec() -> None:
    (job,) = _of_kind("RayJob")
    assert (
        job["spec"]["entrypoint"] == "tandem launch --config /etc/tandem/tandem.yaml --address auto"
    )
    assert job["spec"]["submissionMode"] == "SidecarMode"
    for cluster in _cluster_specs():
        head = cluster["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in head["volumes"]}
        assert volumes[mounts["/etc/tandem"]]["configMap"]["name"] == "tandem-spec"


def test_rayjob_cluster_is_the_raycluster() -> None:
    """The two copies of the cluster shape stay the same (SidecarMode adds restartPolicy only)."""
    (cluster,) = _of_kind("RayCluster")
    (job,) = _of_kind("RayJob")
    copy = yaml.safe_load(yaml.safe_dump(job["spec"]["rayClusterSpec"]))
    assert copy["headGroupSpec"]["template"]["spec"].pop("restartPolicy") == "Never"
    assert copy == cluster["spec"]


def test_kuberay_token_auth_through_a_referenced_secret() -> None:
    for cluster in _cluster_specs():
        auth = cluster["authOptions"]
        assert auth["mode"] == "token" and auth["secretName"]
    assert not _of_kind("Secret"), "a Secret is shipped; it must be created by the operator"


def test_kuberay_dashboard_on_loopback() -> None:
    for cluster in _cluster_specs():
        params = cluster["headGroupSpec"]["rayStartParams"]
        assert params["dashboard-host"] == "127.0.0.1"
        assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        assert not cluster["headGroupSpec"].get("enableIngress", False)
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert "0.0.0.0" not in yaml.safe_dump(group.get("rayStartParams", {}))


def test_services_expose_only_the_client_port() -> None:
    spec = _k8s_tandem_spec()
    metrics = range(spec.metrics.port_base, spec.metrics.port_base + spec.metrics.ports_per_node)
    services = _of_kind("Service")
    assert services
    for service in services:
        ports = service["spec"]["ports"]
        assert [p["port"] for p in ports] == [spec.router.port], service["metadata"]["name"]
        for port in ports:
            target = port.get("targetPort", port["port"])
            assert target == spec.router.port
            assert target not in RAY_PORTS and target not in metrics
    assert not _of_kind("Ingress")


def test_head_container_does_not_publish_ray_control_ports() -> None:
    """KubeRay's head Service publishes the head container's ports: GCS only (workers need it)."""
    spec = _k8s_tandem_spec()
    for cluster in _cluster_specs():
        ports = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        assert {p["containerPort"] for p in ports} == {6379, spec.router.port}


def test_network_policy_keeps_ray_ports_inside() -> None:
    (policy,) = _of_kind("NetworkPolicy")
    rules = policy["spec"]["ingress"]
    open_to_all = [r for r in rules if "from" not in r]
    assert [[p["port"] for p in r["ports"]] for r in open_to_all] == [
        [_k8s_tandem_spec().router.port]
    ]
    for rule in rules:
        for port in rule.get("ports", []):
            assert port["port"] not in RAY_PORTS


def test_tandem_specs_keep_metrics_private_and_require_token_auth() -> None:
    specs = [parse_spec(yaml.safe_load(p.read_text())) for p in DEPLOY.glob("tandem*.yaml")]
    for spec in specs + [_k8s_tandem_spec()]:
        assert spec.metrics.host not in ("0.0.0.0", "::")
        assert spec.ray.require_token_auth


_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9+/_-]{8,}"),
    re.compile(r"auth_token\s*:\s*['\"]?[A-Za-z0-9+/_-]{8,}"),
    re.compile(r"(?i)(password|api[_-]?key|hf_[A-Za-z0-9]{10,})\s*[:=]"),
]


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_no_secret_is_inlined(path: Path) -> None:
    text = path.read_text()
    for pattern in _SECRET_PATTERNS:
        assert not pattern.search(text), f"{path}: {pattern.pattern}"
    for doc in _docs(path):
        for env in _env_entries(doc):
            if env.get("name", "").startswith("RAY_AUTH_TOKEN"):
                assert "value" not in env, f"{path}: {env['name']} has a literal value"


def _env_entries(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = list(node["env"]) if isinstance(node.get("env"), list) else []
        return found + [e for v in node.values() for e in _env_entries(v)]
    if isinstance(node, list):
        return [e for v in node for e in _env_entries(v)]
    return []
