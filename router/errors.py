"""The router's request errors, by a kind that no transport owns. Pure.

`router.flow` and `router.validation` raise `RequestError`; each front door maps its `kind` to
its own status (router/server.py: a gRPC status code, the kinds being named after them), and
reports `details`. `reason` is set for requests refused before serving (the router's metrics
count those by reason); `retry_after_s` is a hint for RESOURCE_EXHAUSTED refusals: the soonest
the router's picture of the load can change, so retrying earlier would meet the same answer.
"""

from __future__ import annotations

import enum
import logging
from typing import TYPE_CHECKING

from engine.errors import InvalidRequestError, TandemError

if TYPE_CHECKING:
    from router.request import RequestTrace


class ErrorKind(enum.Enum):
    """Why a request failed; each front door maps every kind to its own status."""

    INVALID_ARGUMENT = "invalid_argument"  # `field` names the culprit; nothing was allocated
    ALREADY_EXISTS = "already_exists"  # the request id is already being served
    NOT_FOUND = "not_found"
    RESOURCE_EXHAUSTED = "resource_exhausted"  # queue full, SLO infeasible, no KV room
    UNAVAILABLE = "unavailable"  # no healthy worker, or a worker failed while serving
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the caller's deadline passed
    CANCELLED = "cancelled"  # the caller left
    INTERNAL = "internal"  # a bug or an unexpected worker error


class RequestError(TandemError):
    """One request failed; the router and its workers go on.

    `message` says why in words for the caller; `details` is what a front door reports
    ("field: message" for invalid input).
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        field: str | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        assert field is None or kind is ErrorKind.INVALID_ARGUMENT, (
            "only invalid input names a field"
        )
        assert retry_after_s is None or kind is ErrorKind.RESOURCE_EXHAUSTED, (
            "only refusals hint a retry"
        )
        self.kind = kind
        self.message = message
        self.field = field
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(self.details)

    @property
    def details(self) -> str:
        return self.message if self.field is None else f"{self.field}: {self.message}"

    @classmethod
    def invalid(cls, exc: InvalidRequestError) -> RequestError:
        """An invalid field found by validation (reason "invalid_argument" for the metrics)."""
        return cls(
            ErrorKind.INVALID_ARGUMENT, exc.message, field=exc.field, reason="invalid_argument"
        )


# Every front door logs one line for a request that ends in one of these (the others are the
# caller's doing, or its own input).
LOGGED_KINDS = (ErrorKind.INTERNAL, ErrorKind.UNAVAILABLE, ErrorKind.DEADLINE_EXCEEDED)


def log_failure(
    logger: logging.Logger,
    door: str,
    trace: RequestTrace,
    kind: ErrorKind,
    reason: str,
    exc_info: BaseException | None = None,
) -> None:
    """One line (request id, workers' id, stage, kind, reason) for a request that ends in one of
    LOGGED_KINDS; `door` names the front door ("request", "HTTP request")."""
    if kind not in LOGGED_KINDS:
        return
    logger.log(
        logging.ERROR if kind is ErrorKind.INTERNAL else logging.WARNING,
        "%s %s (workers' id %s) failed in stage %s: %s: %s",
        door,
        trace.request_id,
        trace.attempt_id,
        trace.stage.value,
        kind.name,
        reason,
        exc_info=exc_info,
    )
