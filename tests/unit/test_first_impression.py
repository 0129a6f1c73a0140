"""What a newcomer sees in an 80-column terminal or a pipe: progress bars that leave nothing
behind off a terminal, a status view whose tables keep their columns, `--help` without `<bool>`
after flags, a serving banner that does not wrap, and Ray started without its auth warning."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from engine.progress import progress_bar
from tandem.api import generation_pb2 as pb
from tandem.cli import app
from tandem.cluster import KVCapacity
from tandem.serve import ServingDetails, serving_banner
from tandem.status_view import StatusSnapshot, render
from tests.unit.test_status_view import _frame

WIDTH = 80
COMMANDS = ("serve", "generate", "status", "launch", "down")


def _run_bar(console: Console, enabled: bool = True) -> bool:
    with progress_bar(enabled, console=console) as bar:
        task = bar.add_task("loading", total=3)
        for _ in range(3):
            bar.advance(task)
        return bar.disable


def test_a_bar_off_a_terminal_writes_nothing() -> None:
    out = io.StringIO()
    assert _run_bar(Console(file=out, force_terminal=False)) is True
    assert out.getvalue() == ""


def test_a_bar_on_a_terminal_draws_unless_turned_off() -> None:
    out = io.StringIO()
    assert _run_bar(Console(file=out, force_terminal=True, width=WIDTH)) is False
    assert out.getvalue() != ""
    assert _run_bar(Console(file=io.StringIO(), force_terminal=True), enabled=False) is True


def _wide_frame() -> StatusSnapshot:
    """The test frame plus a worker with long names and large figures."""
    snap = _frame()
    load = pb.LoadSnapshot(
        running=12,
        waiting=140,
        queued_prefill_tokens=123456,
        total_kv_blocks=100000,
        free_kv_blocks=12345,
    )
    snap.status.workers.append(
        pb.WorkerStatus(worker_id="colocated-10", pool="colocated", healthy=False, load=load)
    )
    return snap


def test_status_view_keeps_every_column_at_80() -> None:
    console = Console(record=True, width=WIDTH)
    console.print(render(_wide_frame()))
    text = console.export_text()
    assert "…" not in text, text
    for line in text.splitlines():
        assert len(line.rstrip()) <= WIDTH, line
    for header in (
        "worker",
        "pool",
        "healthy",
        "running",
        "waiting",
        "queued",
        "preempt",
        "used",
        "cached",
        "free",
        "hit rate",
        "colocated-10",
        "123456",
        "87655",
        "12345",
    ):
        assert header in text, header


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_as_flags_at_80(command: str | None) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": str(WIDTH), "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output, result.output
    assert "--help" in result.output
    for line in result.output.splitlines():
        assert len(line.rstrip()) <= WIDTH, line


def test_status_help_names_its_flag() -> None:
    result = CliRunner().invoke(app, ["status", "--help"], env={"COLUMNS": str(WIDTH)})
    assert "--watch" in result.output and "-w" in result.output


def test_serving_banner_fits_80_columns() -> None:
    pools = {f"{pool}-{i}": pool for pool in ("prefill", "decode") for i in range(4)}
    details = ServingDetails(
        model_path="/models/Meta-Llama-3.1-8B-Instruct",
        max_model_len=131072,
        kv_capacity={worker: KVCapacity(123456, 16) for worker in pools},
        metrics_targets={"router": "127.0.0.1:9400"} | {w: "127.0.0.1:40001" for w in pools},
    )
    model = "/models/Meta-Llama-3.1-8B-Instruct"
    http = "http://127.0.0.1:8000"
    lines = serving_banner(model, "127.0.0.1:50051", pools, http, details)
    assert lines[0] == "Tandem is serving at 127.0.0.1:50051"
    assert "  decode: decode-0, decode-1, decode-2, decode-3" in lines
    assert "  max context: 131072 tokens" in lines
    assert "    decode-3: 123456 x 16 = 1975296 tokens" in lines
    assert "    router: 127.0.0.1:9400" in lines and "    prefill-0: 127.0.0.1:40001" in lines
    assert lines[-1] == "Press Ctrl-C to stop."
    assert all(len(line) <= WIDTH for line in lines), lines
    plain = serving_banner(model, "127.0.0.1:50051", pools)  # before the workers report
    assert not any("KV" in line or "metrics" in line for line in plain)


_AUTH_PROBE = """
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from tandem.local_ray import use_token_auth
use_token_auth()
print(get_authentication_mode() == AuthenticationMode.TOKEN)
"""


@pytest.mark.parametrize(("preset", "token"), [(None, True), ("disabled", False)])
def test_token_auth_is_chosen_unless_the_user_chose(preset: str | None, token: bool) -> None:
    """Set after `import ray` too (Ray reads the mode at import); a user's mode stays."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if preset is not None:
        env["RAY_AUTH_MODE"] = preset
    probe = [sys.executable, "-c", _AUTH_PROBE]
    out = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(token)


def test_every_progress_bar_comes_from_engine_progress() -> None:
    """A bare rich Progress off a terminal leaves a blank line (one per Ray worker and bar)."""
    root = Path(__file__).resolve().parents[2]
    packages = ("engine", "kvtransfer", "router", "prefill_worker", "decode_worker", "tandem")
    offenders = [
        str(path.relative_to(root))
        for package in packages
        for path in (root / package).rglob("*.py")
        if path != root / "engine" / "progress.py"
        and re.search(r"\bProgress\(|rich\.progress import|\btqdm\b", path.read_text())
    ]
    assert not offenders, f"make bars with engine.progress.progress_bar: {offenders}"
