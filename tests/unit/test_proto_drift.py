"""The committed stubs in tandem/api/ must be exactly what `python -m tandem.api.generate` writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tandem.api import generate


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = {p.name: p.read_text() for p in generate.generate(tmp_path)}
    assert fresh, "no stubs generated: are there .proto files under proto/tandem/v1?"
    for name, text in fresh.items():
        committed = generate.API_DIR / name
        assert committed.exists(), f"{name} is missing: run `python -m tandem.api.generate`"
        assert committed.read_text() == text, f"{name} is stale: run `python -m tandem.api.generate`"


def test_stubs_import_as_tandem_api() -> None:
    from tandem.api import generation_pb2, generation_pb2_grpc

    for path in generate.API_DIR.glob("*_pb2*.py*"):
        assert "from tandem.v1 import" not in path.read_text(), path.name
    assert generation_pb2.DESCRIPTOR.name == "tandem/v1/generation.proto"
    assert generation_pb2_grpc.GenerationStub is not None
