"""The `tandem` command (typer): serve, generate, status, launch, down, plan.

Every user error (a bad flag, an invalid spec, no router or Ray cluster reachable, a request the
router rejects) ends as one `error: ...` message on stderr and exit code 1, never a traceback.
Heavy imports (Ray, torch, grpc) happen inside the commands so `tandem --help` stays fast.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup, TyperOption

from engine.errors import TandemError

if TYPE_CHECKING:
    from tandem.client import TandemClientError


def _flags_take_no_value(params: list[Any]) -> list[Any]:
    """typer's rich help prints each option's type, flags included: `--watch <bool>` reads as if
    it took a value. An empty metavar leaves that cell blank; a flag's parsing never uses it."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_take_no_value(super().get_params(ctx))


app = typer.Typer(
    name="tandem",
    help="Tandem: an LLM serving cluster with separate prefill and decode pools.",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
DEFAULT_ADDRESS = "127.0.0.1:50051"
Address = Annotated[
    str,
    typer.Option(
        "--address",
        "-a",
        envvar="TANDEM_ADDRESS",
        help="The router's host:port (env TANDEM_ADDRESS).",
    ),
]
ClientApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TANDEM_API_KEY",
        show_envvar=True,
        help="The router's API key, when it requires one. Prefer the environment variable: "
        "a key on the command line shows in `ps`.",
    ),
]
SpecPath = Annotated[
    Path, typer.Option("--config", "-c", help="The cluster spec (deploy/tandem.yaml).")
]


class Mode(str, Enum):
    disaggregated = "disaggregated"
    colocated = "colocated"


class Transport(str, Enum):
    auto = "auto"
    grpc = "grpc"
    nccl = "nccl"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Quantization(str, Enum):
    fp8 = "fp8"
    int4 = "int4"


def fail(message: str) -> typer.Exit:
    err_console.print(
        f"[bold red]error:[/bold red] {message}", highlight=False, markup=True, soft_wrap=True
    )
    return typer.Exit(1)


def say(message: str) -> None:
    console.print(message, highlight=False, markup=False)


@app.command(cls=_Command)
def serve(
    model: Annotated[
        str,
        typer.Option(
            help="A checkpoint directory, a .gguf file, 'demo' (SmolLM2-135M-Instruct) or 'tiny-random' (random weights)."
        ),
    ] = "demo",
    mode: Annotated[
        Mode,
        typer.Option(
            metavar="<mode>",
            help="disaggregated (separate prefill and decode pools) or colocated (one pool).",
        ),
    ] = Mode.disaggregated,
    num_prefill: Annotated[
        int | None, typer.Option(min=1, help="Prefill workers (default: 1, or half the GPUs).")
    ] = None,
    num_decode: Annotated[
        int | None, typer.Option(min=1, help="Decode workers (default: 1, or the other GPUs).")
    ] = None,
    num_colocated: Annotated[
        int | None, typer.Option(min=1, help="Colocated workers (--mode colocated).")
    ] = None,
    tensor_parallel_size: Annotated[
        int,
        typer.Option(
            min=1, help="TP ranks per worker (one GPU each on CUDA); KV moves over grpc when > 1."
        ),
    ] = 1,
    host: Annotated[str, typer.Option(help="The router's bind address.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="The router's port (0: any free port).")
    ] = 50051,
    http_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="The OpenAI-compatible HTTP API's port (0: any free port)."
        ),
    ] = 8000,
    no_http: Annotated[
        bool, typer.Option("--no-http", help="Serve no HTTP API, gRPC only.")
    ] = False,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="The router's Prometheus metrics port (0: any free port)."
        ),
    ] = 0,
    drain_timeout: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds running requests may take to finish after Ctrl-C / SIGTERM "
            "(a second signal stops at once).",
        ),
    ] = 30.0,
    device: Annotated[
        Device, typer.Option(help="Where workers run (auto: one GPU each when present).")
    ] = Device.auto,
    dtype: Annotated[str, typer.Option(help="auto, float32, float16 or bfloat16.")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(min=2, help="Context length limit.")] = None,
    quantization: Annotated[
        Quantization | None,
        typer.Option(help="Weight quantization: fp8 (W8A8) or int4 (W4A16), on load."),
    ] = None,
    transport: Annotated[
        Transport, typer.Option(help="KV transport between pools.")
    ] = Transport.auto,
    speculative_config: Annotated[
        str | None,
        typer.Option(
            help="Speculative decoding on the decode workers, as JSON with vLLM's keys, e.g. "
            '\'{"method": "ngram", "num_speculative_tokens": 4}\'.'
        ),
    ] = None,
    async_scheduling: Annotated[
        bool | None,
        typer.Option(
            "--async-scheduling/--no-async-scheduling",
            help="Overlap scheduling: launch the next step while this one runs (default: on "
            "for CUDA workers at TP 1).",
        ),
    ] = None,
    api_key_file: Annotated[
        str | None,
        typer.Option(help="Require this API key (the file's content) from clients."),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Require the API key in this environment variable (default: TANDEM_API_KEY "
            "when set)."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require this API key, for local use only: it shows in `ps`; in production "
            "use --api-key-file or --api-key-env."
        ),
    ] = None,
) -> None:
    """Run a Tandem cluster on this machine (a local Ray instance) until Ctrl-C."""
    from tandem.serve import ServeOptions, preflight
    from tandem.serve import serve as run_serve

    options = ServeOptions(
        model=model,
        mode=mode.value,
        num_prefill=num_prefill,
        num_decode=num_decode,
        num_colocated=num_colocated,
        tensor_parallel_size=tensor_parallel_size,
        host=host,
        port=port,
        http_port=None if no_http else http_port,
        metrics_port=metrics_port,
        drain_timeout_s=drain_timeout,
        device=device.value,
        dtype=dtype,
        max_model_len=max_model_len,
        transport=transport.value,
        extra_engine_kwargs={
            **({} if quantization is None else {"quantization": quantization.value}),
            **({} if async_scheduling is None else {"async_scheduling": async_scheduling}),
        },
        speculative_config=speculative_config,
        api_key=api_key,
        api_key_file=api_key_file,
        api_key_env=api_key_env,
    )
    try:
        preflight(options)  # before the notice: importing engine (torch) takes seconds
        if model == "tiny-random":
            from engine.demo_model import RANDOM_WEIGHTS_NOTICE

            say(f"Serving the built-in tiny-random model {RANDOM_WEIGHTS_NOTICE}")
        run_serve(options, say)
    except (TandemError, OSError) as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # a worker that failed to start surfaces as a Ray error
        raise fail(_one_line(exc)) from None
    say("Stopped.")


@app.command(cls=_Command)
def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt text.")],
    address: Address = DEFAULT_ADDRESS,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float | None, typer.Option(min=0.0, help="0 is greedy.")] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="Per-request sampling seed.")] = None,
    slo: Annotated[
        str | None, typer.Option(help="A named SLO class (e.g. interactive, batch).")
    ] = None,
    api_key: ClientApiKey = None,
) -> None:
    """Stream one request's text from a running cluster, then its per-stage timings."""
    from tandem.client import Client, TandemClientError
    from tandem.timings_view import timings_table

    sampling: dict[str, Any] = {"max_tokens": max_tokens}
    if temperature is not None:
        sampling["temperature"] = temperature
    if seed is not None:
        sampling["seed"] = seed
    _check_reachable(address)
    final = None
    try:
        with Client(address, api_key=api_key) as client:
            for final in client.generate(prompt, slo=slo, **sampling):
                sys.stdout.write(final.text_delta)
                sys.stdout.flush()
    except TandemClientError as exc:
        raise fail(f"the router refused the request: {exc}{_key_hint(exc)}") from None
    sys.stdout.write("\n")
    if final is not None and final.HasField("timings"):
        console.print(
            timings_table([(final.request_id[:8], final.timings, final.completion_tokens)])
        )


@app.command(cls=_Command)
def status(
    address: Address = DEFAULT_ADDRESS,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between refreshes (--watch).")
    ] = 1.0,
    api_key: ClientApiKey = None,
) -> None:
    """Workers, health, load and per-stage latency of a running cluster (tandem.status_view)."""
    from tandem import status_view
    from tandem.client import Client, TandemClientError

    _check_reachable(address)
    try:
        if watch:
            status_view.watch(address, interval, console=console, api_key=api_key)
        else:
            with Client(address, timeout=5.0, api_key=api_key) as client:
                console.print(status_view.render(status_view.collect(address, client)))
    except KeyboardInterrupt:
        pass
    except TandemClientError as exc:
        raise fail(f"cluster status from {address} failed: {exc}{_key_hint(exc)}") from None


@app.command(cls=_Command)
def launch(
    config: SpecPath,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: the spec's ray.address).")
    ] = None,
    foreground: Annotated[
        bool, typer.Option("--foreground", help="Stay attached; Ctrl-C tears the cluster down.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(min=1.0, help="Seconds to wait for every worker to load.")
    ] = 600.0,
) -> None:
    """Start the spec's pools and router on an existing Ray cluster (detached actors)."""
    from tandem.launch import down as run_down
    from tandem.launch import launch as run_launch
    from tandem.spec import load_spec

    try:
        spec = load_spec(config)  # validated before anything starts
        local = (address or spec.ray.address) == "local"
        if local and not foreground:
            say(
                "ray.address is 'local': the Ray instance lives in this process, so launch stays "
                "in the foreground (Ctrl-C tears down)."
            )
        result = run_launch(str(config), address, timeout_s=timeout, say=say)
    except TandemError as exc:
        raise fail(str(exc)) from None
    for note in result.notes:
        say(f"note: {note}")
    say(f"Prometheus targets: {result.service_discovery_file}")
    say(
        f"Tandem is serving at {result.endpoint} (namespace {result.namespace}, "
        f"{len(result.workers)} workers)"
    )
    if result.http_endpoint is not None:
        say(f"OpenAI API: {result.http_endpoint}/v1")
    if foreground or local:
        _wait_for_interrupt()
        run_down(str(config), address, say=say)
        say("Torn down.")


@app.command(cls=_Command)
def down(
    config: SpecPath,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (default: the spec's ray.address).")
    ] = None,
) -> None:
    """Tear down what `tandem launch` started for this spec: router, workers, placement groups."""
    from tandem.launch import down as run_down

    try:
        result = run_down(str(config), address, say=say)
    except TandemError as exc:
        raise fail(str(exc)) from None
    if not result.actors and not result.placement_groups:
        say("Nothing to tear down.")
    else:
        say(
            f"Removed {len(result.actors)} actors and {len(result.placement_groups)} placement groups."
        )


def _register_train_draft() -> None:
    from tandem.train_draft import train_draft

    app.command(name="train-draft", cls=_Command)(train_draft)


_register_train_draft()


def _register_plan() -> None:
    from tandem.plan.cli import plan_app  # typer and rich only at import; the planner inside

    app.add_typer(plan_app, name="plan")


_register_plan()


# ------------------------------------------------------------------ helpers


def _one_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _key_hint(exc: TandemClientError) -> str:
    """A hint for an UNAUTHENTICATED refusal: where the CLI takes the key from."""
    if exc.code.name != "UNAUTHENTICATED":
        return ""
    return " (set TANDEM_API_KEY to the router's API key)"


def _check_reachable(address: str) -> None:
    from tandem.client import Client, TandemClientError

    try:
        with Client(address, timeout=5.0) as probe:
            probe.health()
    except TandemClientError as exc:
        raise fail(
            f"no Tandem router reachable at {address} ({exc.code.name}); start one with "
            "`tandem serve` or pass --address / TANDEM_ADDRESS"
        ) from None


def _wait_for_interrupt() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("Interrupted: tearing down.")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
