"""Tandem's own request fields over HTTP: in the body, or as headers for clients that cannot add
body fields (the official OpenAI clients can, through `extra_body`; proxies and load generators
often cannot).

| body          | header                | type                             |
| ------------- | --------------------- | -------------------------------- |
| `ttft_ms`     | `x-tandem-ttft-ms`    | float, milliseconds              |
| `tpot_ms`     | `x-tandem-tpot-ms`    | float, milliseconds              |
| `slo_class`   | `x-tandem-slo-class`  | a configured class name          |
| `priority`    | `x-tandem-priority`   | int                              |
| `best_effort` | `x-tandem-best-effort`| true / false / 1 / 0 / yes / no  |
| `request_id`  | `x-request-id`        | 1..128 of letters, digits, _.:-  |
| (none)        | `x-tandem-timeout-s`  | float seconds: the deadline      |

A body field wins over its header. `TandemFields.sources` maps each field that came from a
header to that header, so an error about it names what the client actually sent. Raises
`engine.errors.InvalidRequestError` naming the header when one does not parse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from engine.errors import InvalidRequestError, check_request
from router.http import schemas

HEADERS = {
    "ttft_ms": "x-tandem-ttft-ms",
    "tpot_ms": "x-tandem-tpot-ms",
    "slo_class": "x-tandem-slo-class",
    "priority": "x-tandem-priority",
    "best_effort": "x-tandem-best-effort",
    "request_id": "x-request-id",
}
TIMEOUT_HEADER = "x-tandem-timeout-s"
MAX_TIMEOUT_S = 24 * 3600.0
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
T = TypeVar("T")


@dataclass(frozen=True)
class TandemFields:
    """The resolved fields. `deadline` is UNIX seconds (what the workers are told) and
    `deadline_mono` the same instant on `time.monotonic()` (what the front door enforces)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    slo_class: str | None = None
    priority: int | None = None
    best_effort: bool | None = None
    request_id: str | None = None
    deadline: float | None = None
    deadline_mono: float | None = None
    sources: Mapping[str, str] = field(default_factory=dict)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(text)


_PARSERS: dict[str, Callable[[str], object]] = {
    "ttft_ms": _float,
    "tpot_ms": _float,
    "slo_class": str,
    "priority": int,
    "best_effort": _bool,
    "request_id": str,
}


def _parse(header: str, text: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(text.strip())
    except ValueError:
        raise InvalidRequestError(header, f"{text[:64]!r} does not parse") from None


def resolve(body: schemas.TandemFields, headers: Mapping[str, str]) -> TandemFields:
    """The body's Tandem fields, each missing one taken from its header when present."""
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, header in HEADERS.items():
        value = getattr(body, name)
        text = headers.get(header)
        if value is None and text is not None:
            value = _parse(header, text, _PARSERS[name])
            sources[name] = header
        values[name] = value
    deadline, deadline_mono = _deadline(headers.get(TIMEOUT_HEADER))
    return TandemFields(
        **values,  # type: ignore[arg-type]
        deadline=deadline,
        deadline_mono=deadline_mono,
        sources=sources,
    )


def _deadline(text: str | None) -> tuple[float | None, float | None]:
    if text is None:
        return None, None
    timeout_s = _parse(TIMEOUT_HEADER, text, _float)
    check_request(
        0.0 < timeout_s <= MAX_TIMEOUT_S, TIMEOUT_HEADER, f"must be in (0, {MAX_TIMEOUT_S:.0f}]"
    )
    return time.time() + timeout_s, time.monotonic() + timeout_s
