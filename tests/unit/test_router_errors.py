"""The request flow knows no transport: its errors carry a kind that router/server.py maps to a
gRPC status code, and its modules import neither grpc nor the generated protobuf code."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from engine.errors import InvalidRequestError
from router.errors import ErrorKind, RequestError
from router.server import RETRY_PUSHBACK_KEY, STATUS_CODES, status_code, trailing_metadata

ROUTER = Path(__file__).resolve().parents[2] / "router"
TRANSPORT_NEUTRAL = (
    "flow.py",
    "attempt.py",
    "decode_stream.py",
    "request.py",
    "errors.py",
    "stage_clock.py",
    "registry.py",
    "policy.py",
)
EXPECTED_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("name", TRANSPORT_NEUTRAL)
def test_the_request_flow_imports_no_grpc_and_no_protobuf(name: str) -> None:
    imported = _imported_modules(ROUTER / name)
    transport = sorted(m for m in imported if m.split(".")[0] in ("grpc", "grpc_health", "google"))
    generated = sorted(m for m in imported if m == "tandem.api" or m.startswith("tandem.api."))
    assert not transport and not generated, (name, transport, generated)


def test_the_import_check_sees_what_the_server_imports() -> None:
    imported = _imported_modules(ROUTER / "server.py")
    assert "grpc" in imported and "tandem.api.generation_pb2" in imported


@pytest.mark.parametrize("kind", list(ErrorKind), ids=lambda k: k.name)
def test_every_error_kind_maps_to_its_grpc_status_code(kind: ErrorKind) -> None:
    assert status_code(kind) is EXPECTED_CODES[kind]


def test_the_mapping_covers_every_kind_once() -> None:
    assert set(STATUS_CODES) == set(ErrorKind) == set(EXPECTED_CODES)
    assert len(set(STATUS_CODES.values())) == len(ErrorKind)


def test_invalid_input_names_its_field_in_the_details() -> None:
    exc = RequestError.invalid(InvalidRequestError("sampling.top_p", "must be in (0, 1]"))
    assert exc.kind is ErrorKind.INVALID_ARGUMENT and exc.field == "sampling.top_p"
    assert exc.details == "sampling.top_p: must be in (0, 1]" and exc.reason == "invalid_argument"
    plain = RequestError(ErrorKind.UNAVAILABLE, "worker d0 is unavailable")
    assert plain.details == "worker d0 is unavailable" and plain.field is None


def test_a_refusals_retry_hint_becomes_grpc_pushback() -> None:
    refused = RequestError(ErrorKind.RESOURCE_EXHAUSTED, "queue full", retry_after_s=0.25)
    assert trailing_metadata(refused) == ((RETRY_PUSHBACK_KEY, "250"),)
    assert trailing_metadata(RequestError(ErrorKind.INTERNAL, "bug")) == ()


def test_only_the_kinds_they_belong_to_carry_a_field_or_a_retry_hint() -> None:
    with pytest.raises(AssertionError):
        RequestError(ErrorKind.UNAVAILABLE, "x", field="text")
    with pytest.raises(AssertionError):
        RequestError(ErrorKind.UNAVAILABLE, "x", retry_after_s=1.0)
