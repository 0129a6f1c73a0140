"""`make demo` as a newcomer sees it: `python -m tandem.demo` in a fresh process on an
80-column pipe starts the local cluster on the real model, answers the capital-of-France
question with Paris, prints the per-stage latency table and leaves no Ray process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.real_model import skip_without_model  # noqa: E402

skip_without_model()

ROOT = Path(__file__).resolve().parents[2]


def test_make_demo_answers_paris_with_the_stage_table() -> None:
    env = {**os.environ, "COLUMNS": "80", "RAY_ADDRESS": ""}
    done = subprocess.run(
        [sys.executable, "-m", "tandem.demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    answer = out.split("What is the capital of France?", 1)[1].split(">>>", 1)[0]
    assert "Paris" in answer
    for stage in ("router queue", "prefill", "KV transfer", "decode", "TTFT", "end to end"):
        assert stage in out
    lines = (out + done.stderr).splitlines()
    assert [line for line in lines if "pid=" in line or "Started a local Ray" in line] == []
    header, table = lines[:4], [line for line in lines if line[:1] in "┏┃┡│└"]
    assert table and all(len(line) <= 80 for line in header + table)
