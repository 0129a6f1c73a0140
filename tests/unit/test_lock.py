"""requirements.lock pins what pyproject.toml asks for: a dependency added to pyproject without
`make lock` fails here, not on a newcomer's first `make setup` (which installs the lock with
--no-deps and would otherwise leave it out)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[2]
EXTRAS_LOCKED = ("test", "demo")  # what `make setup` installs


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and " " not in line, f"not a plain `name==version` pin: {line!r}"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _wanted() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in EXTRAS_LOCKED:
        lines += project["optional-dependencies"][extra]
    return [Requirement(line) for line in lines]


def test_every_requirement_is_pinned_at_a_version_it_accepts() -> None:
    pins = _pins()
    for req in _wanted():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {req}: run `make lock`"
        )


def test_torch_is_the_makefiles_and_no_cuda_wheels_ride_along() -> None:
    pins = _pins()
    match = re.search(r"^TORCH_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert match is not None
    assert pins["torch"] == Version(match.group(1))
    assert not pins["torch"].local, "torch's local label (+cpu) must not be pinned"
    assert "triton" in pins, "the Triton interpreter runs the kernel tests"
    assert not [n for n in pins if n.startswith("nvidia-")]
