"""Typed errors for user and configuration mistakes (internal invariants use asserts)."""

from __future__ import annotations


class TandemError(Exception):
    """Base class for every error Tandem raises on purpose."""


class InvalidRequestError(TandemError, ValueError):
    """A request (prompt or sampling parameters) is invalid; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(TandemError):
    """A checkpoint cannot be loaded: a missing file, an unsupported architecture, bad shapes."""


class UnsupportedArchitectureError(ModelLoadError):
    def __init__(self, architecture: str, supported: list[str]) -> None:
        super().__init__(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(supported))}"
        )
        self.architecture = architecture


class EngineConfigError(TandemError, ValueError):
    """An engine setting is invalid or the hardware cannot satisfy it."""


def check_request(ok: bool, field: str, message: str) -> None:
    """Raises InvalidRequestError(field, message) unless `ok`: one check of a request field."""
    if not ok:
        raise InvalidRequestError(field, message)


def check_config(ok: bool, field: str, message: str) -> None:
    """Raises EngineConfigError("field: message") unless `ok`: one check of a setting."""
    if not ok:
        raise EngineConfigError(f"{field}: {message}")
