"""Where the Prometheus file-SD list goes by default: never a folder Python could import."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

import tandem
from tandem.service_discovery import default_sd_path, target_groups, write_file_sd
from tandem.spec import MetricsSpec

ROOT = Path(__file__).resolve().parents[2]


def test_python_started_in_the_temp_dir_still_imports_tandem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = write_file_sd(default_sd_path(), target_groups({"router": ["127.0.0.1:9400"]}))
    assert path.is_relative_to(tmp_path) and json.loads(path.read_text())[0]["targets"]
    found = subprocess.run(
        [sys.executable, "-c", "import tandem; print(tandem.__file__)"],
        cwd=tmp_path,  # sys.path[0]: the temp directory
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == tandem.__file__
    assert not path.parent.name.isidentifier()


def test_launch_and_the_prometheus_config_name_the_same_unimportable_folder() -> None:
    default = Path(MetricsSpec().service_discovery_file)
    assert not default.parent.name.isidentifier()
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (files,) = [c["file_sd_configs"][0]["files"] for c in config["scrape_configs"]]
    assert files == [str(default)]
