"""The cluster spec: `deploy/tandem.yaml` as frozen pydantic models, validated before anything starts.

`load_spec(path)` is the one entry point: it parses YAML (duplicate keys rejected), builds a
`ClusterSpec` and turns every validation failure into a `SpecError` whose message names the field
path (`pools.decode.tensor_parallel_size: 8 exceeds the 4 GPUs of node type 'decode_gpu'`).

Every model forbids unknown fields (a typo is an error, never a silently ignored knob) and is
frozen. Cross-field rules live in `model_validator`s that raise `FieldProblem` with a path relative
to the model that checks them. Pure: no Ray, no torch; `tandem.placement` turns a spec into a plan.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from tandem.spec_errors import FieldProblem, SpecError, SpecProblem, problems_from_validation

Port = Annotated[int, Field(ge=1, le=65535)]
_RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RESOURCE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-/]*$")
_SLO_CLASS_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
NODE_IP = "node_ip"  # metrics.host sentinel: bind each process to its Ray node's (private) IP


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolRole(str, Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class ModelSpec(_Model):
    """What every pool serves. `path` is a local Hugging Face checkpoint directory, a .gguf file,
    "demo" (SmolLM2-135M-Instruct) or "tiny-random" (random weights, for tests)."""

    path: str = Field(min_length=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    max_model_len: int | None = Field(default=None, ge=2)


class NodeTypeSpec(_Model):
    """One kind of node a pool runs on, and how Ray recognises it.

    `resource` names a Ray custom resource the node carries (`ray start --resources=
    '{"tandem_decode": 8}'`, set equal to the GPU count: each rank takes one unit); `labels` is a
    node label selector (`ray start --labels=...`). With neither, any node with free GPUs fits.
    """

    gpus: int = Field(ge=0)
    cpus: int | None = Field(default=None, ge=1)
    resource: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_resource(self) -> NodeTypeSpec:
        name = self.resource
        if name is None:
            return self
        if name in _RESERVED_RESOURCES or name.startswith(("node:", "accelerator_type:")):
            raise FieldProblem("resource", f"{name!r} is a Ray built-in resource, not a custom one")
        if not _RESOURCE_NAME.match(name):
            raise FieldProblem("resource", f"{name!r} is not a valid resource name")
        return self


class EngineKnobs(_Model):
    """The per-pool engine settings (mirrors `engine.config.EngineConfig`'s names and limits)."""

    max_num_seqs: int = Field(default=256, ge=1)
    max_num_batched_tokens: int = Field(default=8192, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    block_size: Literal[8, 16, 32, 64, 128] = 16
    # Weight quantization (engine.quant): "fp8" (W8A8) or "int4" (W4A16, quantized on load)
    quantization: Literal["fp8", "int4"] | None = None
    # Speculative decoding (vLLM's keys: method, num_speculative_tokens, ...); a decode or
    # colocated pool's setting (a prefill pool samples one token per request)
    speculative_config: dict[str, Any] | None = None
    # Overlap scheduling (the next step launched while this one runs); None: on where it
    # applies (CUDA, TP 1, no model-based speculation)
    async_scheduling: bool | None = None

    @model_validator(mode="after")
    def _check_speculation(self) -> EngineKnobs:
        if self.speculative_config is not None:
            from engine.spec.config import SpeculativeConfig  # pure: no torch

            try:
                SpeculativeConfig.parse(self.speculative_config)
            except ValueError as err:
                raise FieldProblem(
                    "speculative_config", str(err).removeprefix("speculative_config.")
                ) from None
        return self


class PoolSpec(_Model):
    """A pool: `num_workers` TP groups of `tensor_parallel_size` ranks, each group on one node."""

    node_type: str
    num_workers: int = Field(ge=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    device: Literal["cuda", "cpu"] = "cuda"
    cpus_per_rank: float = Field(default=1.0, gt=0.0)
    engine: EngineKnobs = Field(default_factory=EngineKnobs)

    @model_validator(mode="after")
    def _check_tp(self) -> PoolSpec:
        tp = self.tensor_parallel_size
        if tp & (tp - 1):
            raise FieldProblem("tensor_parallel_size", f"{tp} is not a power of two")
        return self

    def engine_kwargs(self, model: ModelSpec) -> dict[str, Any]:
        """Keyword arguments for `engine.config.EngineConfig` (the lead builds it on the worker)."""
        return {
            "model": model.path,
            "dtype": model.dtype,
            "load_format": model.load_format,
            "max_model_len": model.max_model_len,
            "device": self.device,
            "tensor_parallel_size": self.tensor_parallel_size,
            **self.engine.model_dump(),
        }


class PoolsSpec(_Model):
    """Disaggregated (prefill + decode) pools, a colocated pool, or both (the baseline beside)."""

    prefill: PoolSpec | None = None
    decode: PoolSpec | None = None
    colocated: PoolSpec | None = None

    @model_validator(mode="after")
    def _check_presence(self) -> PoolsSpec:
        if self.prefill is None and self.decode is None and self.colocated is None:
            raise FieldProblem("decode", "no pool defined: give prefill and decode, or colocated")
        if self.prefill is not None and self.decode is None:
            raise FieldProblem("decode", "a prefill pool needs a decode pool to hand requests to")
        if self.decode is not None and self.prefill is None:
            raise FieldProblem("prefill", "a decode pool needs a prefill pool in front of it")
        if self.prefill is not None and self.decode is not None:
            p, d = self.prefill.engine.block_size, self.decode.engine.block_size
            if p != d:
                raise FieldProblem(
                    "decode.engine.block_size",
                    f"{d} differs from pools.prefill.engine.block_size {p}; KV blocks move "
                    "between the pools block by block, so both must use one block size",
                )
        return self

    def items(self) -> list[tuple[PoolRole, PoolSpec]]:
        """The defined pools in a fixed order (decode first: it holds KV the longest)."""
        order = (PoolRole.DECODE, PoolRole.PREFILL, PoolRole.COLOCATED)
        pools = {PoolRole.PREFILL: self.prefill, PoolRole.DECODE: self.decode}
        pools[PoolRole.COLOCATED] = self.colocated
        return [(role, pools[role]) for role in order if pools[role] is not None]  # type: ignore[misc]


class KVSpec(_Model):
    """KV transfer and tiers. `transport="auto"` picks NCCL where two workers can share a
    communicator (same node, or `gpu_fabric: true` for a cluster with a GPU network) else gRPC."""

    transport: Literal["auto", "nccl", "grpc"] = "auto"
    gpu_fabric: bool = False
    cpu_tier_bytes: ByteSize = ByteSize(0)
    nvme_dir: str | None = None
    nvme_tier_bytes: ByteSize = ByteSize(0)
    lease_s: float = Field(default=30.0, gt=0.0)
    grpc_port_base: Port = 50100
    grpc_ports_per_node: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _check_nvme(self) -> KVSpec:
        if self.nvme_tier_bytes > 0 and not self.nvme_dir:
            raise FieldProblem("nvme_dir", "required when nvme_tier_bytes is above 0")
        if self.nvme_dir and self.nvme_tier_bytes == 0:
            raise FieldProblem("nvme_tier_bytes", "is 0 but nvme_dir is set; give the tier a size")
        return self


class SLOClass(_Model):
    """A named latency target. A best-effort class is served when capacity allows, never rejected
    for its SLO; any other class needs at least one target."""

    ttft_ms: float | None = Field(default=None, gt=0.0)
    tpot_ms: float | None = Field(default=None, gt=0.0)
    best_effort: bool = False

    @model_validator(mode="after")
    def _check_targets(self) -> SLOClass:
        if not self.best_effort and self.ttft_ms is None and self.tpot_ms is None:
            raise FieldProblem("ttft_ms", "give ttft_ms and/or tpot_ms, or set best_effort: true")
        return self


class TLSSpec(_Model):
    """TLS for the client port. `client_ca_file` set: clients must present a certificate (mTLS)."""

    enabled: bool = False
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None

    @model_validator(mode="after")
    def _check_files(self) -> TLSSpec:
        if self.enabled:
            for name in ("cert_file", "key_file"):
                if not getattr(self, name):
                    raise FieldProblem(name, "required when tls.enabled is true")
        return self


class RouterSpec(_Model):
    """The client-facing gRPC router; the only port meant to be reachable from outside.

    `api_key_file` (a path) or `api_key_env` (a variable's name) turns API keys on: every call
    but health then needs `authorization: Bearer <key>`. Both are read where `tandem launch`
    runs, before Ray is contacted. A literal key never sits in the spec (`api_key` is refused).
    `http_port`: the OpenAI-compatible HTTP API on `host`, beside the gRPC port (None: off)."""

    host: str = "127.0.0.1"
    port: Port = 50051
    http_port: Port | None = None
    tls: TLSSpec = Field(default_factory=TLSSpec)
    max_message_bytes: ByteSize = ByteSize(64 * 2**20)
    default_slo_class: str | None = None
    api_key_file: str | None = Field(default=None, min_length=1)
    api_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_literal_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "api_key" in data:
            raise FieldProblem(
                "api_key", "a key never sits in a spec; use api_key_file or api_key_env"
            )
        return data

    @model_validator(mode="after")
    def _check_api_key(self) -> RouterSpec:
        if self.api_key_file is not None and self.api_key_env is not None:
            raise FieldProblem("api_key_env", "give api_key_file or api_key_env, not both")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise FieldProblem("api_key_env", f"{self.api_key_env!r} is not an env var name")
        return self


class MetricsSpec(_Model):
    """Prometheus endpoints: one per process, on a private interface, listed in a file_sd file.

    `host` is "node_ip" (each process binds its Ray node's IP, the cluster-internal address),
    a loopback address, or a literal private address; never a wildcard or a public address.
    """

    host: str = NODE_IP
    port_base: Port = 9400
    ports_per_node: int = Field(default=32, ge=2)
    service_discovery_file: str = "/tmp/tandem-prometheus/prometheus_sd.json"

    @model_validator(mode="after")
    def _check_host(self) -> MetricsSpec:
        if self.host in _WILDCARD_HOSTS:
            raise FieldProblem("host", f"{self.host!r} binds every interface; use 'node_ip'")
        if self.host == NODE_IP or self.host == "localhost":
            return self
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError as exc:
            raise FieldProblem("host", f"{self.host!r} is not 'node_ip' or an IP address") from exc
        if not (address.is_private or address.is_loopback):
            raise FieldProblem("host", f"{self.host} is a public address; metrics stay private")
        return self


class RaySpec(_Model):
    """How `tandem launch` joins Ray. With `require_token_auth`, launch refuses a cluster whose
    processes do not run with `RAY_AUTH_MODE=token`; the token itself never sits in the spec."""

    address: str = "auto"
    namespace: str = Field(default="tandem", pattern=r"^[A-Za-z0-9_.-]+$")
    auth_token_env: str = "RAY_AUTH_TOKEN"
    require_token_auth: bool = True

    @model_validator(mode="after")
    def _check_env(self) -> RaySpec:
        if not _ENV_NAME.match(self.auth_token_env):
            raise FieldProblem("auth_token_env", f"{self.auth_token_env!r} is not an env var name")
        return self


class ClusterSpec(_Model):
    """The whole deployment. Built only through validation; never mutated afterwards."""

    version: Literal[1] = 1
    model: ModelSpec
    node_types: dict[str, NodeTypeSpec] = Field(min_length=1)
    pools: PoolsSpec
    kv: KVSpec = Field(default_factory=KVSpec)
    slo_classes: dict[str, SLOClass] = Field(default_factory=dict)
    router: RouterSpec = Field(default_factory=RouterSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> ClusterSpec:
        for role, pool in self.pools.items():
            _check_pool_fits(f"pools.{role.value}", pool, self.node_types)
        _check_transport(self)
        _check_slo_classes(self)
        _check_ports(self)
        return self

    def node_type_of(self, pool: PoolSpec) -> NodeTypeSpec:
        return self.node_types[pool.node_type]


def _check_pool_fits(path: str, pool: PoolSpec, node_types: Mapping[str, NodeTypeSpec]) -> None:
    node = node_types.get(pool.node_type)
    if node is None:
        known = ", ".join(sorted(node_types))
        raise FieldProblem(
            f"{path}.node_type", f"{pool.node_type!r} is not in node_types ({known})"
        )
    tp = pool.tensor_parallel_size
    if pool.device == "cuda" and tp > node.gpus:
        raise FieldProblem(
            f"{path}.tensor_parallel_size",
            f"{tp} exceeds the {node.gpus} GPUs of node type {pool.node_type!r}; "
            "a TP group must fit on one node",
        )
    if node.cpus is not None and tp * pool.cpus_per_rank > node.cpus:
        raise FieldProblem(
            f"{path}.cpus_per_rank",
            f"{tp} ranks x {pool.cpus_per_rank} CPUs exceed the {node.cpus} CPUs of node type "
            f"{pool.node_type!r}",
        )


def _check_transport(spec: ClusterSpec) -> None:
    if spec.kv.transport != "nccl":
        return
    for role, pool in spec.pools.items():
        if pool.device == "cpu":
            raise FieldProblem(
                "kv.transport", f"'nccl' needs CUDA pools; pools.{role.value} is cpu"
            )


def _check_slo_classes(spec: ClusterSpec) -> None:
    for name in spec.slo_classes:
        if not _SLO_CLASS_NAME.match(name):
            raise FieldProblem(f"slo_classes.{name}", "class names are lowercase [a-z0-9_-]")
    default = spec.router.default_slo_class
    if default is not None and default not in spec.slo_classes:
        known = ", ".join(sorted(spec.slo_classes)) or "none defined"
        raise FieldProblem(
            "router.default_slo_class", f"{default!r} is not in slo_classes ({known})"
        )


def _check_ports(spec: ClusterSpec) -> None:
    """The router port and the per-node metrics / KV gRPC port ranges: in range and disjoint."""
    ranges = {"router.port": (spec.router.port, 1)}
    if spec.router.http_port is not None:
        ranges["router.http_port"] = (spec.router.http_port, 1)
    ranges |= {
        "metrics.port_base": (spec.metrics.port_base, spec.metrics.ports_per_node),
        "kv.grpc_port_base": (spec.kv.grpc_port_base, spec.kv.grpc_ports_per_node),
    }
    for name, (start, count) in ranges.items():
        if start + count - 1 > 65535:
            raise FieldProblem(name, f"range {start}..{start + count - 1} passes port 65535")
    names = list(ranges)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            (a, na), (b, nb) = ranges[first], ranges[second]
            if a < b + nb and b < a + na:
                raise FieldProblem(
                    first,
                    f"ports {_span(a, na)} overlap {second} ({_span(b, nb)}); "
                    "every port must be distinct",
                )


def _span(start: int, count: int) -> str:
    return str(start) if count == 1 else f"{start}..{start + count - 1}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key given twice (the plain one keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def parse_spec(data: Any, source: str | None = None) -> ClusterSpec:
    """Validates an already-parsed mapping; raises `SpecError` naming every bad field."""
    if not isinstance(data, Mapping):
        kind = "an empty document" if data is None else type(data).__name__
        raise SpecError(
            [SpecProblem("<spec>", f"expected a mapping at the top, got {kind}")], source
        )
    try:
        return ClusterSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise SpecError(problems_from_validation(exc, ClusterSpec), source) from None


def load_spec(path: str | os.PathLike[str]) -> ClusterSpec:
    """Reads and validates a spec file. Raises `SpecError` (never a raw YAML or pydantic error)."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as exc:
        raise SpecError([SpecProblem("<file>", f"cannot read: {exc.strerror}")], source) from None
    except yaml.YAMLError as exc:
        reason = f"not valid YAML: {exc}".replace("\n", " ")
        raise SpecError([SpecProblem("<file>", reason)], source) from None
    return parse_spec(data, source)
