"""The package graph says the architecture: every first-party import of every module (module
level and inside functions alike) goes in an allowed direction.

The table of allowed directions is written once, in docs/architecture.md ("Allowed import
directions"); this test parses it from there, so the document and the code cannot drift.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("engine", "kvtransfer", "router", "prefill_worker", "decode_worker", "tandem")
SECTION = "## Allowed import directions"


def _table_rows(markdown: str, heading: str) -> list[list[str]]:
    body = markdown.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows]


def _names(cell: str) -> tuple[str, ...]:
    """The backticked names of a cell, less those in parenthesised remarks."""
    return tuple(re.findall(r"`([A-Za-z_.*]+)`", re.sub(r"\([^)]*\)", "", cell)))


def allowed_table() -> dict[str, tuple[str, ...]]:
    """layer prefix -> the prefixes it may import (besides itself); '*' means anything."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = {_names(row[0])[0]: _names(row[1]) for row in _table_rows(text, SECTION)}
    assert table, f"no rows under {SECTION!r} in docs/architecture.md"
    return table


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, name: str) -> str:
    """`from module import name`: the submodule when `name` is one, else the module."""
    candidate = ROOT / Path(*f"{module}.{name}".split("."))
    return (
        f"{module}.{name}"
        if candidate.is_dir() or candidate.with_suffix(".py").is_file()
        else module
    )


def first_party_imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [_resolve(node.module, alias.name) for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in FIRST_PARTY:
                yield node.lineno, name


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str, table: dict[str, tuple[str, ...]]) -> str | None:
    matches = [prefix for prefix in table if _under(name, prefix)]
    return max(matches, key=len) if matches else None


def is_allowed(importer: str, imported: str, table: dict[str, tuple[str, ...]]) -> bool:
    layer = layer_of(importer, table)
    assert layer is not None, f"{importer} belongs to no layer of the table"
    target = layer_of(imported, table)
    if target == layer or (target is not None and _under(target, layer) and layer != "tandem"):
        return True
    allowed = table[layer]
    return "*" in allowed or any(_under(imported, prefix) for prefix in allowed)


def package_files() -> list[Path]:
    return sorted(p for pkg in FIRST_PARTY for p in (ROOT / pkg).rglob("*.py"))


def violations(table: dict[str, tuple[str, ...]]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module_name(path)} -> {imported}"
        for path in package_files()
        for line, imported in first_party_imports(path)
        if not is_allowed(module_name(path), imported, table)
    ]


def test_every_import_goes_in_an_allowed_direction() -> None:
    assert violations(allowed_table()) == []


def test_every_module_belongs_to_a_layer() -> None:
    table = allowed_table()
    assert [m for m in map(module_name, package_files()) if layer_of(m, table) is None] == []


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("router.flow", "engine.engine"),  # the router never reaches the engine runtime
        ("engine.models.llama", "engine.distributed.parallel_state"),  # models know no TP
        ("engine.layers.linear", "engine.executor.executor"),  # layers know no orchestration
        ("kvtransfer.handle", "router.server"),
        ("tandem.api.generation_pb2", "tandem.client"),  # the generated leaf imports nothing
        ("prefill_worker.worker", "router.flow"),  # workers know the contract, not the router
        ("decode_worker.worker", "prefill_worker.worker"),
        ("engine.engine", "kvtransfer.sender"),  # the engine never imports kvtransfer
    ],
)
def test_the_table_refuses_upward_imports(importer: str, imported: str) -> None:
    assert not is_allowed(importer, imported, allowed_table())


def test_nothing_that_serves_imports_the_test_doubles() -> None:
    users = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in package_files()
        if not _under(module_name(path), "tandem.testing")
        for line, name in first_party_imports(path)
        if _under(name, "tandem.testing")
    ]
    assert users == []


TORCH_DISTRIBUTED_OK = (
    "engine.distributed",
    "engine.executor",
    "kvtransfer.transports",  # departure: the KV data plane (docs/architecture.md)
    "kvtransfer.pool_link",
)


def test_only_the_distributed_layers_import_torch_distributed() -> None:
    found = []
    for path in package_files():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom) and node.module
                else []
            )
            if any(_under(n, "torch.distributed") for n in names):
                module = module_name(path)
                if not any(_under(module, ok) for ok in TORCH_DISTRIBUTED_OK):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
