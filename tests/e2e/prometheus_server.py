"""A real Prometheus server for tests: Debian's `prometheus` package, on 127.0.0.1, with a
temporary config and TSDB directory, scraping the targets of a file-SD list every second.

`ensure_prometheus()` finds the binary, installing the Debian package when it is missing and
this is a Debian-like machine where we are root (`apt-get update`, `apt-get install -y
--no-install-recommends prometheus`); otherwise it skips the calling test with the reason.
Every wait polls with a deadline; nothing sleeps for a fixed long time.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

INSTALL_TIMEOUT_S = 600


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", *args], env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )


def ensure_prometheus() -> str:
    """Path of the `prometheus` binary, installing Debian's package if needed (else pytest.skip)."""
    found = shutil.which("prometheus")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip(
            "prometheus is not installed and apt-get is unavailable (not a Debian-like machine)"
        )
    if os.geteuid() != 0:
        pytest.skip("prometheus is not installed and installing Debian's package needs root")
    update = _apt("update")
    if update.returncode != 0:
        pytest.skip(f"apt-get update failed (no package mirror reachable?): {update.stderr[-500:]}")
    install = _apt("install", "-y", "--no-install-recommends", "prometheus")
    assert install.returncode == 0, f"apt-get install prometheus failed:\n{install.stderr[-2000:]}"
    found = shutil.which("prometheus")
    assert found, "the prometheus package installed no prometheus binary on PATH"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25
) -> Any:
    """Poll `check()` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, ValueError) as exc:  # not up yet, or an answer we cannot parse yet
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; last: {last!r}")


class PrometheusServer:
    def __init__(
        self, binary: str, workdir: Path, sd_file: str, rule_files: Sequence[Path] = ()
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": "tandem",
                    "file_sd_configs": [{"files": [sd_file], "refresh_interval": "1s"}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        args = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        wait_for(self._ready, 60, "Prometheus to become ready")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()[-3000:]}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
            return resp.status == 200

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, raises AssertionError with Prometheus' error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            body = json.load(exc)
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector (or a one-element list for a scalar)."""
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float:
        """The single value of an expression that yields one sample (NaN when it yields none)."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} gave {len(result)} series"
        return float(result[0]["value"][1]) if result else math.nan

    def wait_value(self, expr: str, expected: float, timeout_s: float = 30.0) -> float:
        """Poll until the expression equals `expected` (counters reach a workload's totals)."""
        wait_for(
            lambda: self.value(expr) == expected,
            timeout_s,
            f"{expr} == {expected} (now {self.value(expr)})",
        )
        return expected

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._log.close()
