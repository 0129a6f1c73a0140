"""The planner's typed errors: what the user gave that cannot be planned, naming the input."""

from __future__ import annotations

from engine.errors import TandemError


class PlanError(TandemError):
    """A planning input is unusable. `field` names it (a CLI option or a profile field path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NoFeasibleConfigError(PlanError):
    """No configuration meets the SLOs at any rate; `closest` describes the nearest miss."""

    def __init__(self, message: str, closest: str) -> None:
        super().__init__("slo", message)
        self.closest = closest
