"""What differs, in substance, between two directories of generated stubs.

Substance is what the wire and the code see: each `_pb2.py`'s FileDescriptorProto (messages,
fields, enums, services, options), each `_pb2_grpc.py`'s RPC paths with their streaming kinds,
each `.pyi`'s classes and attributes. Not substance: the generator's version headers
(`# Protobuf Python Version`, `GRPC_GENERATED_VERSION`) and its formatting, which change with
every grpcio-tools release without changing a byte on the wire.

Nothing here imports the stubs: the descriptor is read from the `AddSerializedFile(b'...')`
literal, so comparing never registers a second file of the same name in the descriptor pool.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Callable
from pathlib import Path

from google.protobuf import descriptor_pb2, text_format

_RPC = re.compile(r"channel\.(unary_unary|unary_stream|stream_unary|stream_stream)\(\s*'([^']+)'")
_STUB_GLOBS = ("*_pb2.py", "*_pb2_grpc.py", "*_pb2.pyi")
_MAX_DIFF_LINES = 12


def serialized_descriptor(pb2_source: str) -> bytes:
    """The serialized FileDescriptorProto a `_pb2.py` registers (`AddSerializedFile`'s bytes)."""
    for node in ast.walk(ast.parse(pb2_source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
        ):
            value = ast.literal_eval(node.args[0])
            assert isinstance(value, bytes), "AddSerializedFile takes bytes"
            return value
    raise ValueError("no AddSerializedFile(b'...') call: not a protoc-generated _pb2.py")


def file_descriptor(pb2_source: str) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    proto.ParseFromString(serialized_descriptor(pb2_source))
    return proto


def _descriptor_lines(source: str) -> list[str]:
    return text_format.MessageToString(file_descriptor(source)).splitlines()


def _rpc_lines(source: str) -> list[str]:
    """`path kind` for each RPC a client stub calls, sorted."""
    return sorted(f"{path} {kind}" for kind, path in _RPC.findall(source))


def _pyi_lines(source: str) -> list[str]:
    """`Class.attribute: annotation` for every annotated attribute, and every class name."""
    lines: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        lines.append(f"class {node.name}")
        for item in node.body:
            if isinstance(item, ast.AnnAssign):
                target, annotation = ast.unparse(item.target), ast.unparse(item.annotation)
                lines.append(f"{node.name}.{target}: {annotation}")
    return sorted(lines)


def _substance(name: str) -> Callable[[str], list[str]]:
    if name.endswith("_pb2_grpc.py"):
        return _rpc_lines
    if name.endswith(".pyi"):
        return _pyi_lines
    return _descriptor_lines


def _stub_names(directory: Path) -> set[str]:
    return {p.name for pattern in _STUB_GLOBS for p in directory.glob(pattern)}


def _file_drift(name: str, committed: str, fresh: str) -> str | None:
    substance = _substance(name)
    diff = list(
        difflib.unified_diff(
            substance(committed), substance(fresh), "committed", "fresh", n=0, lineterm=""
        )
    )
    if not diff:
        return None
    shown = diff[2 : 2 + _MAX_DIFF_LINES]  # skip the ---/+++ header
    return f"{name} is stale:\n  " + "\n  ".join(shown)


def stub_drift(committed_dir: Path, fresh_dir: Path) -> list[str]:
    """One message per stale, missing or extra stub; empty when `committed_dir` is current."""
    committed, fresh = _stub_names(committed_dir), _stub_names(fresh_dir)
    problems = [f"{name} is missing" for name in sorted(fresh - committed)]
    problems += [f"{name} has no .proto any more" for name in sorted(committed - fresh)]
    for name in sorted(committed & fresh):
        drift = _file_drift(
            name, (committed_dir / name).read_text(), (fresh_dir / name).read_text()
        )
        if drift is not None:
            problems.append(drift)
    return problems
