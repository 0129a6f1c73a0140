"""The `tandem` command: flags and errors in-process (typer's CliRunner), and `tandem serve` as a
real subprocess driven by `tandem generate` / `tandem status`, then stopped with SIGINT."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tandem.cli import app
from tandem.client import Client

TANDEM = [sys.executable, "-m", "tandem.cli"]
REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "generate", "status", "launch", "down"):
        assert command in result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["serve", "--device", "cpu", "--transport", "nccl"], "--transport"),
        (["serve", "--device", "cpu", "--mode", "colocated", "--transport", "nccl"], "--transport"),
        (
            ["serve", "--device", "cpu", "--speculative-config", '{"method": "medusa2"}'],
            "--speculative-config",
        ),
        (["serve", "--device", "cpu", "--speculative-config", "{k: 3"], "--speculative-config"),
    ],
)
def test_unsupported_serve_flags_fail_cleanly_before_starting(args, flag):
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert f"error: {flag}" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--mode", "sideways"],
        ["serve", "--num-decode", "0"],
        ["generate"],
        ["status", "--interval", "0"],
    ],
)
def test_malformed_flags_are_usage_errors(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_no_router_reachable_is_one_line():
    for command in (["generate", "hello"], ["status"]):
        result = runner.invoke(app, [*command, "--address", f"127.0.0.1:{_free_port()}"])
        assert result.exit_code == 1
        assert "no Tandem router reachable" in result.output and "Traceback" not in result.output


def test_invalid_spec_fails_naming_the_field(tmp_path):
    spec = yaml.safe_load((REPO / "deploy" / "tandem-local.yaml").read_text())
    spec["pools"]["decode"]["tensor_parallel_size"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    for command in ("launch", "down"):
        result = runner.invoke(app, [command, "--config", str(path), "--address", "127.0.0.1:1"])
        assert result.exit_code == 1, result.output
        assert (
            "pools.decode.tensor_parallel_size" in result.output
            and "Traceback" not in result.output
        )


def test_launch_without_a_ray_cluster_is_one_line():
    spec = str(REPO / "deploy" / "tandem-local.yaml")
    result = _cli("launch", "--config", spec, "--address", f"127.0.0.1:{_free_port()}")
    assert result.returncode == 1
    assert (
        "error: ray.address: no Ray cluster answers" in result.stderr
        and "Traceback" not in result.stderr
    )


class Served:
    """`tandem serve` in its own session, its output lines collected by a reader thread."""

    def __init__(self, port: int, *flags: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
        env.pop("RAY_ADDRESS", None)
        self.proc = subprocess.Popen(
            # --http-port 0: the default 8000 may be taken on a shared machine
            [
                *TANDEM,
                "serve",
                "--port",
                str(port),
                "--http-port",
                "0",
                *(flags or ("--device", "cpu")),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if text in self.lines.get(timeout=0.5):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        raise AssertionError(f"no {text!r} from tandem serve:\n{''.join(self.output)}")

    def session_processes(self) -> list[str]:
        out = subprocess.run(
            ["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True
        ).stdout
        return [line for line in out.splitlines() if line.split()[0] == str(self.proc.pid)]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Served, str]]:
    port = _free_port()
    server = Served(port, "--device", "cpu", "--model", "tiny-random")
    try:
        server.wait_for("Tandem is serving", 180)
        yield server, f"127.0.0.1:{port}"
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run(
        [*TANDEM, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )


def test_generate_streams_text_then_the_timing_table(served):
    _, address = served
    with Client(address) as client:
        expected, _ = client.generate_text(
            "Hello there", temperature=0.0, max_tokens=8, ignore_eos=True
        )
    result = _cli(
        "generate", "Hello there", "--address", address, "--max-tokens", "8", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(expected + "\n")  # greedy: the same text the client got
    for stage in ("router queue", "prefill", "KV transfer", "decode", "TTFT", "end to end"):
        assert stage in result.stdout


def test_the_openai_client_talks_to_tandem_serve(served):
    """The banner names the OpenAI-compatible endpoint; the official client gets the greedy text
    the gRPC client gets from the same server."""
    import openai

    server, address = served
    [line] = [x for x in server.output if "OpenAI API:" in x]
    base_url = line.split("OpenAI API:", 1)[1].strip()
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    with Client(address) as client:
        expected, _ = client.generate_text(
            "Hello there", temperature=0.0, max_tokens=8, ignore_eos=True
        )
    api = openai.OpenAI(base_url=base_url, api_key="unused", timeout=60)
    [model] = api.models.list().data
    done = api.completions.create(
        model=model.id,
        prompt="Hello there",
        max_tokens=8,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert done.choices[0].text == expected
    assert done.usage is not None and done.usage.completion_tokens == 8


def test_generate_reads_the_address_from_the_environment(served):
    _, address = served
    env = {**os.environ, "TANDEM_ADDRESS": address}
    result = subprocess.run(
        [*TANDEM, "generate", "hi", "--max-tokens", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "end to end" in result.stdout


def test_status_lists_both_workers(served):
    _, address = served
    result = _cli("status", "--address", address)
    assert result.returncode == 0, result.stderr
    for text in ("prefill-0", "decode-0", "prefill", "decode"):
        assert text in result.stdout


def test_sigint_stops_serve_cleanly(served):
    server, address = served
    assert server.session_processes(), "serve's session should hold its Ray processes"
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=30) == 0, "".join(server.output)
    assert "Stopped." in "".join(server.output)
    deadline = time.monotonic() + 15
    while server.session_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.session_processes() == []
    result = runner.invoke(app, ["status", "--address", address])
    assert result.exit_code == 1


def _num_gpus() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.mark.gpu
@pytest.mark.skipif(_num_gpus() < 2, reason="needs 2 CUDA GPUs (one prefill, one decode worker)")
def test_serve_on_gpus_one_worker_per_gpu():
    port = _free_port()
    server = Served(port, "--device", "cuda", "--num-prefill", "1", "--num-decode", "1")
    try:
        server.wait_for("Tandem is serving", 300)
        result = _cli(
            "generate", "Hello there", "--address", f"127.0.0.1:{port}", "--max-tokens", "16"
        )
        assert result.returncode == 0, result.stderr
        assert "KV transfer" in result.stdout
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=30) == 0
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
