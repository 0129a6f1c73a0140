"""Per-stage latency of finished requests as a rich table (`tandem generate`, `make demo`).

A row per stage of `tandem.v1.StageTimings` (seconds on the wire, milliseconds here), a column
per request. A stage a request did not go through (a colocated worker has no KV
transfer) shows "-".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

# (StageTimings field, column title), in the order a request passes the stages.
STAGES: tuple[tuple[str, str], ...] = (
    ("router_queue", "router queue"),
    ("prefill_queue", "prefill queue"),
    ("prefill", "prefill"),
    ("kv_transfer", "KV transfer"),
    ("decode_queue", "decode queue"),
    ("decode", "decode"),
    ("time_to_first_token", "TTFT"),
    ("end_to_end", "end to end"),
)


def stage_ms(timings: Any) -> dict[str, float | None]:
    """Milliseconds per stage field; None for a stage the message does not carry."""
    return {
        name: (getattr(timings, name) * 1e3 if timings.HasField(name) else None)
        for name, _ in STAGES
    }


def timings_table(
    rows: Sequence[tuple[str, Any, int]], title: str = "per-stage latency (ms)"
) -> Table:
    """`rows`: (label, StageTimings, completion tokens) per request. A row per stage and a column
    per request, so a few requests fit an 80-column terminal."""
    table = Table(title=title)
    table.add_column("stage")
    for label, _, _ in rows:
        table.add_column(f"request {label}", justify="right")
    per_request = [stage_ms(timings) for _, timings, _ in rows]
    for name, header in STAGES:
        table.add_row(
            header, *[("-" if ms[name] is None else f"{ms[name]:.1f}") for ms in per_request]
        )
    table.add_row("tokens", *[str(n) for _, _, n in rows], end_section=False)
    return table
