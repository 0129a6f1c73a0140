"""Service-level objectives: named classes and how a request's SLO is resolved. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import InvalidRequestError

MAX_TARGET_MS = 24 * 3600 * 1000.0


@dataclass(frozen=True)
class SloClass:
    """A named SLO: targets in seconds (None: no target) and whether it may run best-effort."""

    name: str
    ttft_s: float | None
    tpot_s: float | None
    best_effort: bool = False
    priority: int = 0  # default priority of the class; lower is served first


DEFAULT_SLO_CLASSES: Mapping[str, SloClass] = {
    c.name: c
    for c in (
        SloClass("interactive", ttft_s=1.0, tpot_s=0.1, priority=0),
        SloClass("batch", ttft_s=30.0, tpot_s=1.0, priority=10),
        SloClass("best_effort", ttft_s=None, tpot_s=None, best_effort=True, priority=20),
    )
}
DEFAULT_CLASS = "interactive"


@dataclass(frozen=True)
class Slo:
    """A request's resolved SLO. `best_effort` requests are never rejected for missing targets."""

    ttft_s: float | None
    tpot_s: float | None
    best_effort: bool
    priority: int


def _target_s(value_ms: float | None, field_name: str) -> float | None:
    if value_ms is None:
        return None
    if not (math.isfinite(value_ms) and 0.0 < value_ms <= MAX_TARGET_MS):
        raise InvalidRequestError(field_name, f"must be in (0, {MAX_TARGET_MS:.0f}] ms")
    return value_ms / 1000.0


def resolve_slo(
    classes: Mapping[str, SloClass],
    *,
    slo_class: str | None = None,
    ttft_ms: float | None = None,
    tpot_ms: float | None = None,
    priority: int | None = None,
    best_effort: bool | None = None,
) -> Slo:
    """The class's targets (DEFAULT_CLASS when unnamed), overridden by explicit fields.

    Raises InvalidRequestError naming `slo_class`, `ttft_ms` or `tpot_ms`.
    """
    name = DEFAULT_CLASS if slo_class is None else slo_class
    base = classes.get(name)
    if base is None:
        raise InvalidRequestError(
            "slo_class", f"unknown class {name[:64]!r}; known: {sorted(classes)}"
        )
    ttft = _target_s(ttft_ms, "ttft_ms")
    tpot = _target_s(tpot_ms, "tpot_ms")
    return Slo(
        ttft_s=ttft if ttft is not None else base.ttft_s,
        tpot_s=tpot if tpot is not None else base.tpot_s,
        best_effort=base.best_effort if best_effort is None else best_effort,
        priority=base.priority if priority is None else priority,
    )
