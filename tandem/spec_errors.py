"""Errors of the cluster spec (`deploy/tandem.yaml`): every one names the field path it is about.

`FieldProblem` is what the spec's cross-field validators raise (a `ValueError`, so pydantic wraps
it); `SpecError` is what `load_spec` raises: pydantic's location joined with the problem's own
relative path, e.g. `pools.decode.tensor_parallel_size: 8 exceeds the 4 GPUs of node type ...`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from engine.errors import TandemError


class FieldProblem(ValueError):
    """One invalid value; `field` is relative to the model whose validator raised it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class SpecProblem:
    """One problem of a spec: a dotted field path (`pools.decode.engine.block_size`) and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class SpecError(TandemError, ValueError):
    """A cluster spec is invalid. `field` is the first problem's path; `problems` holds all of them.

    Raised before anything starts (no Ray call, no process), so a bad spec never half-launches.
    """

    def __init__(self, problems: Iterable[SpecProblem], source: str | None = None) -> None:
        self.problems = tuple(problems)
        assert self.problems, "a SpecError needs at least one problem"
        self.source = source
        self.field = self.problems[0].field
        self.reason = self.problems[0].reason
        where = f"{source}: " if source else ""
        lines = [f"{where}{self.problems[0]}"]
        lines += [f"  also {p}" for p in self.problems[1:]]
        super().__init__("\n".join(lines))


def problems_from_validation(error: ValidationError, model: type[BaseModel]) -> list[SpecProblem]:
    """Turns pydantic's errors into field-named problems, in the order pydantic found them."""
    return [_problem(dict(err), model) for err in error.errors()]


def _problem(err: dict[str, Any], model: type[BaseModel]) -> SpecProblem:
    loc = [str(part) for part in err.get("loc", ())]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldProblem):
        return SpecProblem(_join(loc + [cause.field]), cause.reason)
    if err.get("type") == "extra_forbidden":
        return SpecProblem(_join(loc), _unknown_field_reason(loc, model))
    reason = str(err.get("msg", "invalid value"))
    if "input" in err and err.get("type") != "missing":
        reason = f"{reason} (got {_short(err['input'])})"
    return SpecProblem(_join(loc) or "<spec>", reason)


def _unknown_field_reason(loc: list[str], model: type[BaseModel]) -> str:
    allowed = _allowed_fields(loc[:-1], model)
    if allowed is None:
        return "unknown field"
    close = difflib.get_close_matches(loc[-1], allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field (allowed: {', '.join(sorted(allowed))}){hint}"


def _allowed_fields(parent: list[str], model: type[BaseModel]) -> list[str] | None:
    """Field names of the model found at `parent`; None when the path leaves the model tree."""
    current: Any = model
    for part in parent:
        if not _is_model(current):
            current = _dict_value_type(current)
            if current is None:
                return None
            continue
        info = current.model_fields.get(part)
        if info is None:
            return None
        current = _unwrap(info.annotation)
    if _is_model(current):
        return list(current.model_fields)
    return None


def _unwrap(annotation: Any) -> Any:
    """`X | None` -> X; `dict[str, X]` stays (resolved by the next path part)."""
    args = getattr(annotation, "__args__", None)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def _dict_value_type(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is dict and args and len(args) == 2:
        return _unwrap(args[1])
    return None


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _join(parts: list[str]) -> str:
    return ".".join(p for p in parts if p)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
