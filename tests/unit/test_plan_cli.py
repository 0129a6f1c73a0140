"""`tandem plan` on the command line: the plan it writes deploys, and bad input is refused
with a clear message and a non-zero exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.cli import app
from tandem.plan.profile import save_profile
from tandem.spec import load_spec
from tests.unit.test_plan_sim import toy_profile

runner = CliRunner()


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "toy.json"
    save_profile(toy_profile(), path)
    return path


def _plan(profile: Path, out: Path, *extra: str) -> tuple[int, str]:
    args = ["plan", "--profile", str(profile), "--workload", "mix:2:1", "--unit", "32", "--tp", "1"]
    args += ["--duration", "4", "--ttft-ms", "500", "--tpot-ms", "50", "--out", str(out), *extra]
    result = runner.invoke(app, args)
    return result.exit_code, result.output


def test_plan_prints_the_answer_and_writes_a_spec_that_launch_accepts(
    profile_file: Path, tmp_path: Path
) -> None:
    code, output = _plan(profile_file, tmp_path / "out", "--gpus", "3")
    assert code == 0, output
    assert "should I disaggregate?" in output and "(best)" in output
    spec = load_spec(tmp_path / "out" / "cluster.yaml")  # what `tandem launch --config` parses
    pools = [pool for _, pool in spec.pools.items()]
    assert sum(p.num_workers * p.tensor_parallel_size for p in pools) <= 3
    assert spec.slo_classes["planned"].ttft_ms == 500
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["best"] and plan["curves"]
    assert (tmp_path / "out" / "attainment.png").read_bytes().startswith(b"\x89PNG")


def test_an_unknown_workload_file_is_refused(profile_file: Path, tmp_path: Path) -> None:
    args = ["plan", "--profile", str(profile_file), "--workload", str(tmp_path / "nope.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "no such workload file" in result.output and "nope.json" in result.output


def test_an_unknown_profile_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "--profile", "no-such-gpu"])
    assert result.exit_code == 1 and "no shipped profile" in result.output


def test_slos_nothing_meets_are_refused_with_the_closest(
    profile_file: Path, tmp_path: Path
) -> None:
    code, output = _plan(profile_file, tmp_path / "out", "--gpus", "2", "--ttft-ms", "1")
    assert code == 2
    assert "no configuration within 2 GPUs meets" in output
    assert "closest:" in output and "P90 TTFT" in output


def test_a_budget_too_small_for_one_worker_is_refused(profile_file: Path, tmp_path: Path) -> None:
    code, output = _plan(profile_file, tmp_path / "out", "--gpus", "1", "--tp", "2")
    assert code == 1 and "smaller than one worker" in output
