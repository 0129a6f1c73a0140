"""Prometheus file-based service discovery: the target list every Tandem launcher writes.

One Prometheus config (deploy/prometheus/prometheus.yml) reads this file through
`file_sd_configs`; Prometheus re-reads it when it changes, so the file is replaced atomically
(write a sibling temporary file, then rename). Groups are one per role ("router", "prefill",
"decode", "colocated") with labels `job="tandem"` and `tandem_role=<role>`, the same shape as
`tandem.placement.prometheus_file_sd` produces for `tandem launch`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

JOB = "tandem"
# Not an identifier: a folder of the temp directory named `tandem` would be imported as the
# `tandem` package by any Python started there (a directory is a namespace package, found on
# sys.path before the installed one's finder), so no folder we create there may be importable.
SD_DIR_NAME = "tandem-prometheus"
SD_FILE_NAME = "prometheus_sd.json"


def default_sd_path() -> Path:
    """`<tmp>/tandem-prometheus/prometheus_sd.json`: where a local cluster writes its targets by
    default (deploy/prometheus/prometheus.yml reads it)."""
    return Path(tempfile.gettempdir()) / SD_DIR_NAME / SD_FILE_NAME


def target_groups(targets_by_role: Mapping[str, Iterable[str]]) -> list[dict[str, Any]]:
    """File-SD groups: `[{"targets": [...], "labels": {"job": "tandem", "tandem_role": role}}]`."""
    groups = []
    for role, targets in targets_by_role.items():
        listed = sorted(set(targets))
        if listed:
            groups.append({"targets": listed, "labels": {"job": JOB, "tandem_role": role}})
    return groups


def write_file_sd(path: str | os.PathLike[str], groups: list[dict[str, Any]]) -> Path:
    """Replace `path` atomically with the JSON target groups; creates the directory. Returns the path."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".prometheus_sd-", suffix=".json", dir=final.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final
