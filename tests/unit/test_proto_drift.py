"""The committed stubs in tandem/api/ must say what `python -m tandem.api.generate` would write.

Compared in substance (tandem.api.drift): descriptors, RPCs, typed attributes; the generator's
version headers may differ, since every grpcio-tools release writes its own.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import grpc
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tandem.api import drift, generate

pytest.importorskip("grpc_tools")


def _copy_protos(tmp_path: Path) -> Path:
    root = tmp_path / "proto"
    shutil.copytree(generate.PROTO_ROOT, root)
    return root


def _edit_proto(root: Path, name: str, old: str, new: str) -> None:
    path = root / generate.PROTO_PACKAGE_DIR / name
    text = path.read_text()
    assert old in text, f"{name} no longer has {old!r}: update this test"
    path.write_text(text.replace(old, new, 1))


def test_committed_stubs_match_the_protos() -> None:
    problems = generate.check()
    assert not problems, "run `make protos`:\n" + "\n".join(problems)


def test_the_descriptor_compared_is_the_one_that_runs() -> None:
    from tandem.api import generation_pb2, kvtransfer_pb2

    for module in (generation_pb2, kvtransfer_pb2):
        source = (generate.API_DIR / f"{module.__name__.rsplit('.', 1)[1]}.py").read_text()
        assert drift.serialized_descriptor(source) == module.DESCRIPTOR.serialized_pb


def test_a_new_field_without_regenerating_is_caught(tmp_path: Path) -> None:
    root = _copy_protos(tmp_path)
    _edit_proto(
        root,
        "generation.proto",
        "message AbortRequest {",
        "message AbortRequest {\n  string reason = 99;",
    )
    problems = generate.check(generate.API_DIR, root)
    assert any(p.startswith("generation_pb2.py is stale") and "reason" in p for p in problems)
    assert any(p.startswith("generation_pb2.pyi is stale") for p in problems)


def test_a_changed_rpc_without_regenerating_is_caught(tmp_path: Path) -> None:
    root = _copy_protos(tmp_path)
    _edit_proto(root, "generation.proto", "rpc Abort(", "rpc Cancel(")
    problems = generate.check(generate.API_DIR, root)
    grpc_problem = next(p for p in problems if p.startswith("generation_pb2_grpc.py is stale"))
    assert "/tandem.v1.Generation/Cancel" in grpc_problem


def test_a_new_proto_file_is_caught(tmp_path: Path) -> None:
    root = _copy_protos(tmp_path)
    extra = root / generate.PROTO_PACKAGE_DIR / "extra.proto"
    extra.write_text('syntax = "proto3";\npackage tandem.v1;\nmessage Extra { int32 x = 1; }\n')
    problems = generate.check(generate.API_DIR, root)
    assert "extra_pb2.py is missing" in problems


def test_only_the_generator_version_differing_is_no_drift(tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    shutil.copytree(generate.API_DIR, stubs, ignore=shutil.ignore_patterns("__pycache__"))
    for path in stubs.glob("*_pb2*.py"):
        text = re.sub(
            r"Protobuf Python Version: [\d.]+", "Protobuf Python Version: 99.0.0", path.read_text()
        )
        text = re.sub(
            r"GRPC_GENERATED_VERSION = '[\d.]+'", "GRPC_GENERATED_VERSION = '9.9.9'", text
        )
        path.write_text(text.replace("\n\n\n", "\n\n"))  # formatting too
    assert generate.check(stubs) == []


def test_stubs_import_as_tandem_api() -> None:
    from tandem.api import generation_pb2, generation_pb2_grpc

    for path in generate.API_DIR.glob("*_pb2*.py*"):
        assert "from tandem.v1 import" not in path.read_text(), path.name
    assert generation_pb2.DESCRIPTOR.name == "tandem/v1/generation.proto"
    rpcs = [m.name for m in generation_pb2.DESCRIPTOR.services_by_name["Generation"].methods]
    assert {"Generate", "Abort", "GetModelInfo", "GetClusterStatus"} <= set(rpcs)
    with grpc.insecure_channel("127.0.0.1:1") as channel:  # lazy: connects to nothing
        stub = generation_pb2_grpc.GenerationStub(channel)
        assert [name for name in rpcs if not callable(getattr(stub, name, None))] == []
    servicer = generation_pb2_grpc.GenerationServicer
    assert [name for name in rpcs if not callable(getattr(servicer, name, None))] == []


def _lower_bound(requirement: str) -> Version:
    bounds = [Version(s.version) for s in Requirement(requirement).specifier if s.operator == ">="]
    assert bounds, f"{requirement} has no lower bound"
    return max(bounds)


def test_pyproject_asks_for_the_runtimes_the_stubs_need() -> None:
    """The stubs raise at import under a grpcio or protobuf older than their generator's."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = generate.REPO_ROOT / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    deps = {Requirement(d).name: d for d in dependencies}
    for path in generate.API_DIR.glob("*_pb2_grpc.py"):
        grpc_needs = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text())
        assert grpc_needs is not None
        assert _lower_bound(deps["grpcio"]) >= Version(grpc_needs.group(1)), path.name
    for path in generate.API_DIR.glob("*_pb2.py"):
        pb_needs = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text()
        )
        assert pb_needs is not None
        assert _lower_bound(deps["protobuf"]) >= Version(".".join(pb_needs.groups())), path.name
