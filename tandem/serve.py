"""`tandem serve`: a LocalCluster on this machine until SIGINT / SIGTERM.

`serve_config(options, num_gpus)` turns the command's flags into a `ClusterConfig` (pure but for
reading the API key's file or variable, `serve_api_key`; raises `ServeError` naming the flag);
`serve(...)` starts a loopback-bound local Ray (or joins the one `RAY_ADDRESS` names), the
workers and the router, announces the endpoint, and on a signal stops the router, kills the
actors and shuts down the Ray instance it started. A signal during start-up cancels the start and
cleans up the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import TandemError
from router.auth import ApiKeyError, load_api_key
from tandem.cluster import ClusterConfig, LocalCluster

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
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"
    max_model_len: int | None = None
    transport: str = "auto"  # auto | grpc | nccl
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
        engine_kwargs=engine_kwargs,
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


def serving_banner(
    model: str, address: str, pools: dict[str, str], http_address: str | None = None
) -> list[str]:
    """What `tandem serve` says once up, in short lines (as one line it wrapped mid-address in an
    80-column terminal). `pools` maps worker id -> pool; each pool gets a line of its workers.
    `http_address`: the OpenAI-compatible API's base URL, when it is served."""
    by_pool: dict[str, list[str]] = {}
    for worker, pool in pools.items():
        by_pool.setdefault(pool, []).append(worker)
    lines = [f"Tandem is serving at {address}", f"  model: {model}"]
    if http_address is not None:
        lines.append(f"  OpenAI API: {http_address}/v1")
    lines += [f"  {pool}: {', '.join(workers)}" for pool, workers in by_pool.items()]
    return [*lines, "Press Ctrl-C to stop."]


def serve(
    options: ServeOptions, say: Say, on_ready: Callable[[LocalCluster], None] | None = None
) -> None:
    """Blocks until SIGINT / SIGTERM; every resource it started is released on return."""
    import ray

    from tandem.local_ray import start_local_ray

    config = serve_config(options, gpu_count(options.device))
    started = start_local_ray()
    try:
        asyncio.run(_serve(config, say, on_ready))
    finally:
        if started:
            ray.shutdown()


async def _serve(
    config: ClusterConfig, say: Say, on_ready: Callable[[LocalCluster], None] | None
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = LocalCluster(config)
    starting = asyncio.ensure_future(cluster.start())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            address = starting.result()  # raises the start-up error
            for line in serving_banner(config.model, address, cluster.pools, cluster.http_address):
                say(line)
            if on_ready is not None:
                on_ready(cluster)
            await stopping
        say("Stopping: router, then workers.")
    finally:
        starting.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await cluster.stop()
