"""`tandem launch` / `tandem down`: a Tandem cluster on an existing Ray cluster, from a spec.

launch(spec_path, address) stages, each failing with a typed error that names a field:
  1. validate the spec (`SpecError`) and read the router's API key, if any (`LaunchError`
     naming `router.api_key_file` / `router.api_key_env`); nothing has contacted Ray yet;
  2. join Ray (`ray.init(address=..., namespace=spec.ray.namespace)`), refuse a cluster without
     token auth when `ray.require_token_auth`, plan from `ray.nodes()` (`PlacementError`);
  3. per worker (a TP group): a detached STRICT_PACK placement group of the plan's pinned bundles,
     then its detached, named actor in bundle 0, which starts its TP followers in bundles 1..
     (they share its fate); wait until every worker loaded its model;
  4. the router: a detached async actor pinned to the head node (`tandem.router_actor`), which
     binds `router.host:router.port` and registers the workers;
  5. write the Prometheus file-SD list to `metrics.service_discovery_file`.
A failure after stage 3 began tears down what was created (the same path as `down`), so a
failed launch leaves nothing behind. KV moves over NCCL when every planned prefill -> decode link
is NCCL (one KV group over the workers' rank 0s, `kv_groups`), over gRPC otherwise.

Hazard: several Ray nodes on one IP (a simulated cluster) would collide on the plan's per-node
metrics ports; launch then binds any free port and writes the bound targets to the file-SD list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.launch_config import (
    LaunchError,
    actor_resources,
    kv_groups,
    kv_transport_notes,
    router_config,
    spec_api_key,
    worker_kwargs,
)
from tandem.placement import ClusterPlan, WorkerPlan, nodes_from_ray, plan_cluster
from tandem.router_actor import ROUTER_ACTOR_NAME, RouterActor, RouterWorker
from tandem.spec import ClusterSpec, load_spec

log = logging.getLogger(__name__)
Say = Callable[[str], None]
__all__ = ["LaunchError", "LaunchResult", "DownResult", "launch", "down"]


@dataclass(frozen=True)
class LaunchResult:
    endpoint: str
    namespace: str
    workers: tuple[WorkerPlan, ...]
    notes: tuple[str, ...]  # KV transport fallbacks and other deviations from the plan
    service_discovery_file: str
    http_endpoint: str | None = None  # the OpenAI-compatible API's base URL (router.http_port)


@dataclass(frozen=True)
class DownResult:
    actors: tuple[str, ...]
    placement_groups: tuple[str, ...]


def launch(
    spec_path: str, address: str | None = None, *, timeout_s: float = 600.0, say: Say = log.info
) -> LaunchResult:
    spec = load_spec(spec_path)
    api_key = spec_api_key(spec)
    connect(spec, address)
    check_token_auth(spec)
    nodes = nodes_from_ray(_ray().nodes())
    plan = plan_cluster(spec, nodes)
    if _named_actors(spec.ray.namespace):
        raise LaunchError(
            "ray.namespace",
            f"a Tandem cluster already runs in namespace "
            f"{spec.ray.namespace!r}; run `tandem down --config {spec_path}` first",
        )
    fixed_ports = len({n.ip for n in nodes}) == len(nodes)
    notes = tuple(kv_transport_notes(plan))
    for note in notes:
        say(note)
    try:
        endpoint, targets = _start(spec, plan, fixed_ports, timeout_s, say, api_key)
    except BaseException:
        try:
            teardown(spec)
        except Exception:  # noqa: BLE001 - the launch error matters more than cleanup's
            log.exception("cleanup after a failed launch")
        raise
    sd_file = _write_file_sd(spec, plan, targets if not fixed_ports else None)
    http = None
    if spec.router.http_port is not None:  # the client port's host, the HTTP port
        http = f"http://{endpoint.rsplit(':', 1)[0]}:{spec.router.http_port}"
    return LaunchResult(endpoint, spec.ray.namespace, plan.workers, notes, sd_file, http)


def down(spec_path: str, address: str | None = None, *, say: Say = log.info) -> DownResult:
    """Stop the router gracefully, kill every Tandem actor of the spec's namespace and remove
    their placement groups; empties the file-SD list. Idempotent."""
    spec = load_spec(spec_path)
    connect(spec, address)
    result = teardown(spec)
    _clear_file_sd(spec)
    for name in result.actors:
        say(f"killed {name}")
    return result


# ------------------------------------------------------------------ joining Ray


def _ray() -> Any:
    import ray

    return ray


def connect(spec: ClusterSpec, address: str | None) -> None:
    """Join the Ray cluster at `address` (default: the spec's `ray.address`) unless this process
    already did. Raises LaunchError("ray.address") when none answers."""
    ray = _ray()
    if ray.is_initialized():
        return
    target = address or spec.ray.address
    extra: dict[str, Any] = {}
    if target == "local":  # a new single-machine instance, owned by this process
        from tandem.local_ray import bind_ray_to_loopback, use_token_auth

        bind_ray_to_loopback()
        use_token_auth()
        extra["include_dashboard"] = False
    _check_listening(target)
    try:
        ray.init(
            address=target, namespace=spec.ray.namespace, logging_level=logging.WARNING, **extra
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchError(
            "ray.address", f"cannot join a Ray cluster at {target!r}: {exc}"
        ) from None


def _check_listening(target: str) -> None:
    """Fail fast on a `host:port` nobody listens on (ray.init would retry for minutes)."""
    import socket

    host, sep, port = target.rpartition(":")
    if not sep or "://" in target or not port.isdigit():
        return  # "auto", "local", "ray://...": Ray resolves and reports these itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5.0).close()
    except OSError as exc:
        raise LaunchError(
            "ray.address", f"no Ray cluster answers at {target}: {exc.strerror or exc}"
        ) from None


def check_token_auth(spec: ClusterSpec) -> None:
    """With `ray.require_token_auth`: this process and a task on every node must run with
    `RAY_AUTH_MODE=token` (a driver alone in token mode can still reach an open cluster)."""
    if not spec.ray.require_token_auth:
        return
    ray = _ray()
    hint = (
        "start every Ray node with RAY_AUTH_MODE=token (docs/deploy.md, section 2), or set "
        "ray.require_token_auth: false for a private test cluster"
    )
    if not _token_auth_enabled():
        raise LaunchError(
            "ray.require_token_auth", f"this process does not use Ray token auth; {hint}"
        )
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_token_auth_enabled)
    nodes = nodes_from_ray(ray.nodes())
    refs = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)
        ).remote()
        for n in nodes
    ]
    open_nodes = [n.ip for n, ok in zip(nodes, ray.get(refs, timeout=120)) if not ok]
    if open_nodes:
        raise LaunchError(
            "ray.require_token_auth", f"nodes {open_nodes} run without token auth; {hint}"
        )


def _token_auth_enabled() -> bool:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return bool(is_token_auth_enabled())


# ------------------------------------------------------------------ starting


def _start(
    spec: ClusterSpec,
    plan: ClusterPlan,
    fixed_ports: bool,
    timeout_s: float,
    say: Say,
    api_key: str | None,
) -> tuple[str, dict[str, list[str]]]:
    deadline = time.monotonic() + timeout_s
    groups = [_placement_group(w) for w in plan.workers]
    _wait_placed(plan, groups, deadline)
    kv = kv_groups(plan, fixed_ports, _free_port)
    actors = [
        _worker_actor(spec, w, pg, fixed_ports, kv.get(w.name))
        for w, pg in zip(plan.workers, groups)
    ]
    infos = _wait_loaded(plan, actors, deadline)
    metrics = _get([a.metrics_address.remote() for a in actors], deadline, "pools")
    for w in plan.workers:
        say(f"{w.name} on {w.node_ip} ({w.device})")
    workers = [
        RouterWorker(w.name, w.role.value, w.actor_name(0), t)
        for w, t in zip(plan.workers, metrics)
    ]
    router = _router_actor(spec, plan)
    started = _get(
        router.start.remote(
            router_config(spec, plan, infos[0], fixed_ports, api_key),
            infos[0]["model_path"],
            workers,
            spec.ray.namespace,
        ),
        deadline,
        "router",
    )
    targets: dict[str, list[str]] = {
        "router": [started["metrics_target"]] if started["metrics_target"] else []
    }
    for w, target in zip(plan.workers, metrics):
        if target:
            targets.setdefault(w.role.value, []).append(target)
    return plan.router.endpoint, targets


def _placement_group(worker: WorkerPlan) -> Any:
    from ray.util.placement_group import placement_group

    return placement_group(
        worker.pinned_bundles(),
        strategy=worker.strategy,
        name=worker.placement_group_name,
        lifetime="detached",
    )


def _wait_placed(plan: ClusterPlan, groups: list[Any], deadline: float) -> None:
    ray = _ray()
    for worker, pg in zip(plan.workers, groups):
        ready, _ = ray.wait([pg.ready()], timeout=max(deadline - time.monotonic(), 1.0))
        if not ready:
            raise LaunchError(
                f"pools.{worker.role.value}",
                f"{worker.placement_group_name} was not "
                f"placed on {worker.node_ip} in time; resources taken since planning?",
            )


def _worker_actor(
    spec: ClusterSpec, worker: WorkerPlan, pg: Any, fixed_ports: bool, kv_group: Any = None
) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from tandem.actors import create_worker_actor

    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
    return create_worker_actor(
        worker.role.value,
        worker_kwargs(spec, worker, fixed_ports, kv_group),
        name=worker.actor_name(0),
        namespace=spec.ray.namespace,
        lifetime="detached",
        scheduling_strategy=strategy,
        **actor_resources(worker),
    )


def _wait_loaded(plan: ClusterPlan, actors: list[Any], deadline: float) -> list[dict[str, Any]]:
    infos = []
    for worker, actor in zip(plan.workers, actors):
        infos.append(_get(actor.info.remote(), deadline, f"pools.{worker.role.value}", worker.name))
    return infos


def _get(refs: Any, deadline: float, field: str, what: str | None = None) -> Any:
    ray = _ray()
    try:
        return ray.get(refs, timeout=max(deadline - time.monotonic(), 1.0))
    except ray.exceptions.GetTimeoutError:
        raise LaunchError(field, f"{what or field} did not start in time") from None
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise LaunchError(field, f"{what or field} failed to start: {first}") from None


def _router_actor(spec: ClusterSpec, plan: ClusterPlan) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = _ray()
    strategy = NodeAffinitySchedulingStrategy(plan.router.node_id, soft=False)
    return (
        ray.remote(RouterActor)
        .options(
            name=ROUTER_ACTOR_NAME,
            namespace=spec.ray.namespace,
            lifetime="detached",
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=strategy,
        )
        .remote()
    )


# ------------------------------------------------------------------ tearing down


def _named_actors(namespace: str) -> list[str]:
    entries = _ray().util.list_named_actors(all_namespaces=True)
    return sorted(
        e["name"]
        for e in entries
        if e["namespace"] == namespace and e["name"].startswith("tandem-")
    )


def teardown(spec: ClusterSpec) -> DownResult:
    """Kill the namespace's Tandem actors (router first, gracefully) and their placement groups."""
    ray = _ray()
    namespace = spec.ray.namespace
    names = _named_actors(namespace)
    if ROUTER_ACTOR_NAME in names:
        router = ray.get_actor(ROUTER_ACTOR_NAME, namespace=namespace)
        try:
            ray.get(router.stop.remote(), timeout=15)
        except Exception:  # noqa: BLE001 - a dead or stuck router is killed below anyway
            pass
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
        except ValueError:  # gone since listed
            pass
    return DownResult(tuple(names), tuple(_remove_groups(spec, names)))


def _remove_groups(spec: ClusterSpec, actor_names: list[str]) -> list[str]:
    """Placement groups named after this spec's workers or the actors just killed."""
    ray = _ray()
    from ray.util.placement_group import PlacementGroup

    wanted = {n.removesuffix("-rank0") for n in actor_names}
    for role, pool in spec.pools.items():
        wanted |= {f"tandem-{role.value}-{i}" for i in range(pool.num_workers)}
    removed = []
    for pg_id, entry in ray.util.placement_group_table().items():
        if entry["name"] in wanted and entry["state"] != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed.append(entry["name"])
    return sorted(removed)


# ------------------------------------------------------------------ service discovery


def _write_file_sd(spec: ClusterSpec, plan: ClusterPlan, bound: dict[str, list[str]] | None) -> str:
    from tandem.placement import prometheus_file_sd
    from tandem.service_discovery import target_groups, write_file_sd

    groups = prometheus_file_sd(plan) if bound is None else target_groups(bound)
    return str(write_file_sd(spec.metrics.service_discovery_file, groups))


def _clear_file_sd(spec: ClusterSpec) -> None:
    from pathlib import Path

    from tandem.service_discovery import write_file_sd

    if Path(spec.metrics.service_discovery_file).exists():
        write_file_sd(spec.metrics.service_discovery_file, [])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
