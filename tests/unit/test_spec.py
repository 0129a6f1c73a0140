"""The cluster spec: every shipped spec validates; every bad one fails naming its field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tandem.spec import ClusterSpec, PoolRole, load_spec, parse_spec
from tandem.spec_errors import SpecError

REPO = Path(__file__).resolve().parents[2]
SHIPPED_SPECS = sorted((REPO / "deploy").glob("tandem*.yaml"))


def _base() -> dict[str, Any]:
    return yaml.safe_load((REPO / "deploy" / "tandem.yaml").read_text())


def _fails(mutate: Callable[[dict[str, Any]], None]) -> SpecError:
    data = _base()
    mutate(data)
    with pytest.raises(SpecError) as info:
        parse_spec(data, "test.yaml")
    return info.value


def test_shipped_specs_exist() -> None:
    names = {p.name for p in SHIPPED_SPECS}
    assert {"tandem.yaml", "tandem-local.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED_SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path) -> None:
    spec = load_spec(path)
    assert isinstance(spec, ClusterSpec)
    assert spec.pools.items(), "a spec with no pool passed validation"


def test_two_node_example_reads_as_documented() -> None:
    spec = load_spec(REPO / "deploy" / "tandem.yaml")
    assert spec.pools.prefill is not None and spec.pools.decode is not None
    assert spec.node_type_of(spec.pools.prefill).resource == "tandem_prefill"
    assert spec.node_type_of(spec.pools.decode).resource == "tandem_decode"
    assert spec.kv.cpu_tier_bytes == 64 * 2**30  # "64GiB" parsed to bytes
    assert spec.router.default_slo_class in spec.slo_classes
    assert spec.ray.require_token_auth
    assert not spec.model.path.startswith(("/home", "/work", "/root"))


def test_spec_is_frozen() -> None:
    spec = parse_spec(_base())
    with pytest.raises(ValidationError):
        spec.router.port = 1  # type: ignore[misc]


def test_engine_kwargs_carry_pool_and_model_settings() -> None:
    spec = parse_spec(_base())
    assert spec.pools.decode is not None
    kwargs = spec.pools.decode.engine_kwargs(spec.model)
    assert kwargs["tensor_parallel_size"] == spec.pools.decode.tensor_parallel_size
    assert kwargs["model"] == spec.model.path
    assert kwargs["block_size"] == spec.pools.decode.engine.block_size


def test_every_engine_knob_is_an_engine_config_field() -> None:
    """A pool's engine settings reach `EngineConfig` by name: none may be unknown to it."""
    from dataclasses import fields

    from engine.config import EngineConfig

    data = _base()
    data["pools"]["decode"]["engine"] = {"async_scheduling": False}
    spec = parse_spec(data)
    assert spec.pools.decode is not None
    kwargs = spec.pools.decode.engine_kwargs(spec.model)
    assert kwargs["async_scheduling"] is False
    assert set(kwargs) <= {f.name for f in fields(EngineConfig)}


def test_unknown_field_is_named_with_a_suggestion() -> None:
    err = _fails(lambda d: d["pools"]["decode"].update(tensor_paralel_size=4))
    assert err.field == "pools.decode.tensor_paralel_size"
    assert "unknown field" in str(err) and "'tensor_parallel_size'" in str(err)


def test_unknown_top_level_and_dict_entry_fields() -> None:
    assert _fails(lambda d: d.update(extra=1)).field == "extra"
    err = _fails(lambda d: d["node_types"]["decode_gpu"].update(gpu=4))
    assert err.field == "node_types.decode_gpu.gpu" and "'gpus'" in str(err)


def test_tp_larger_than_node_gpus() -> None:
    err = _fails(lambda d: d["node_types"]["decode_gpu"].update(gpus=2))
    assert err.field == "pools.decode.tensor_parallel_size"
    assert "exceeds the 2 GPUs of node type 'decode_gpu'" in err.reason
    err = _fails(lambda d: d["pools"]["decode"].update(tensor_parallel_size=16))
    assert str(err).startswith(
        "test.yaml: pools.decode.tensor_parallel_size: 16 exceeds the 8 GPUs"
    )


def test_tp_must_be_a_power_of_two() -> None:
    err = _fails(lambda d: d["pools"]["prefill"].update(tensor_parallel_size=3))
    assert err.field == "pools.prefill.tensor_parallel_size" and "power of two" in err.reason


def test_no_decode_pool() -> None:
    err = _fails(lambda d: d["pools"].pop("decode"))
    assert err.field == "pools.decode"


def test_no_prefill_pool() -> None:
    assert _fails(lambda d: d["pools"].pop("prefill")).field == "pools.prefill"


def test_colocated_alone_is_enough() -> None:
    data = _base()
    data["pools"] = {"colocated": data["pools"]["decode"]}
    spec = parse_spec(data)
    assert [role for role, _ in spec.pools.items()] == [PoolRole.COLOCATED]


def test_no_pool_at_all() -> None:
    assert _fails(lambda d: d.update(pools={})).field == "pools.decode"


def test_block_sizes_must_match_across_pools() -> None:
    err = _fails(lambda d: d["pools"]["decode"]["engine"].update(block_size=32))
    assert err.field == "pools.decode.engine.block_size"


def test_unknown_node_type() -> None:
    err = _fails(lambda d: d["pools"]["decode"].update(node_type="h100"))
    assert err.field == "pools.decode.node_type" and "decode_gpu" in err.reason


def test_cpus_per_rank_over_node_cpus() -> None:
    err = _fails(lambda d: d["pools"]["decode"].update(cpus_per_rank=40))
    assert err.field == "pools.decode.cpus_per_rank"


@pytest.mark.parametrize(
    ("section", "key", "value", "field"),
    [
        ("router", "port", 70000, "router.port"),
        ("router", "port", 0, "router.port"),
        ("router", "port", 9410, "router.port"),  # inside the metrics range
        ("metrics", "port_base", 50110, "metrics.port_base"),  # overlaps the KV gRPC range
        ("metrics", "port_base", 65530, "metrics.port_base"),  # range runs past 65535
        ("kv", "grpc_port_base", 50051, "router.port"),  # router port inside the KV range
    ],
)
def test_bad_ports(section: str, key: str, value: int, field: str) -> None:
    err = _fails(lambda d: d[section].update({key: value}))
    assert err.field == field, str(err)


def test_tls_on_without_files() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["router"]["tls"] = {"enabled": True, "cert_file": "/etc/tls/tls.crt"}

    err = _fails(mutate)
    assert err.field == "router.tls.key_file" and "required" in err.reason


def test_tls_on_with_files_validates() -> None:
    data = _base()
    data["router"]["tls"]["enabled"] = True
    assert parse_spec(data).router.tls.enabled


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8", "not-an-ip"])
def test_metrics_host_must_stay_private(host: str) -> None:
    assert _fails(lambda d: d["metrics"].update(host=host)).field == "metrics.host"


def test_metrics_host_private_literal_accepted() -> None:
    data = _base()
    data["metrics"]["host"] = "10.1.2.3"
    assert parse_spec(data).metrics.host == "10.1.2.3"


def test_slo_class_needs_a_target_or_best_effort() -> None:
    assert _fails(lambda d: d["slo_classes"].update(x={})).field == "slo_classes.x.ttft_ms"


def test_default_slo_class_must_exist() -> None:
    err = _fails(lambda d: d["router"].update(default_slo_class="gold"))
    assert err.field == "router.default_slo_class"


def test_nccl_forced_with_cpu_pools() -> None:
    data = yaml.safe_load((REPO / "deploy" / "tandem-local.yaml").read_text())
    data["kv"]["transport"] = "nccl"
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert info.value.field == "kv.transport"


def test_nvme_bytes_without_dir() -> None:
    assert _fails(lambda d: d["kv"].pop("nvme_dir")).field == "kv.nvme_dir"


def test_bad_byte_size_names_field() -> None:
    err = _fails(lambda d: d["kv"].update(cpu_tier_bytes="lots"))
    assert err.field == "kv.cpu_tier_bytes" and "'lots'" in str(err)


def test_custom_resource_cannot_be_builtin() -> None:
    err = _fails(lambda d: d["node_types"]["decode_gpu"].update(resource="GPU"))
    assert err.field == "node_types.decode_gpu.resource"


def test_missing_required_field() -> None:
    assert _fails(lambda d: d.pop("model")).field == "model"


def test_load_spec_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SpecError, match="empty document"):
        load_spec(empty)


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    text = (REPO / "deploy" / "tandem.yaml").read_text()
    dup = tmp_path / "dup.yaml"
    dup.write_text(text + "\nrouter:\n  port: 50052\n")
    with pytest.raises(SpecError, match="duplicate key 'router'"):
        load_spec(dup)


def test_every_problem_is_reported() -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["router"]["port"] = 0
        d["kv"]["lease_s"] = -1

    err = _fails(mutate)
    assert {p.field for p in err.problems} == {"router.port", "kv.lease_s"}
