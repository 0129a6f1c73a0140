"""HTTP errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

`ApiError` is the one exception the HTTP front door raises for a request it refuses or fails;
`install_handlers(app)` turns it, pydantic's `RequestValidationError` (a body that does not
parse: 400, `param` the field path such as `messages` or `temperature`) and starlette's own
`HTTPException`s (unknown route 404, wrong method 405, unreadable body 400) into that shape.

`STATUSES` is the one table from the router's `ErrorKind` to (HTTP status, OpenAI type);
`ApiError.from_request_error` applies it, with the refusal's `Retry-After` header (whole
seconds, rounded up, from `RequestError.retry_after_s`) and `param` mapped from the router's
field name to the HTTP body's (`sampling.temperature` -> `temperature`; see `body_param`).
`code` is the refusal's reason when it has one (`slo_infeasible`, `queue_full`, ...), else the
kind's name in lower case.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.errors import InvalidRequestError
from router.errors import ErrorKind, RequestError

STATUSES: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_ARGUMENT: (400, "invalid_request_error"),
    ErrorKind.ALREADY_EXISTS: (409, "conflict_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    ErrorKind.UNAVAILABLE: (503, "service_unavailable_error"),
    ErrorKind.DEADLINE_EXCEEDED: (504, "timeout_error"),
    ErrorKind.CANCELLED: (499, "cancelled_error"),  # nginx's "client closed request"
    ErrorKind.INTERNAL: (500, "server_error"),
}
# Errors of the HTTP layer itself, by status, for statuses no ErrorKind maps to.
TYPES: dict[int, str] = {
    401: "authentication_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    **{status: kind for status, kind in STATUSES.values()},
}
_UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


class ApiError(Exception):
    """A request the HTTP front door answers with an error. `param` names the body field (or
    header) at fault; `headers` go on the response (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_request_error(
        cls, exc: RequestError, renames: Mapping[str, str] | None = None
    ) -> ApiError:
        """The router's error as HTTP: status and type from `STATUSES`, `param` the body's name
        of `exc.field` (see `body_param`), Retry-After from a refusal's hint."""
        status, _ = STATUSES[exc.kind]
        param = None if exc.field is None else body_param(exc.field, renames)
        message = exc.message if param is None else f"{param}: {exc.message}"
        headers = {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return cls(status, message, param=param, code=exc.reason or exc.kind.value, headers=headers)


def body_param(field: str, renames: Mapping[str, str] | None = None) -> str:
    """The HTTP body's name of a router field: `sampling.` dropped (gRPC-style names), then
    `renames` applied (e.g. `max_tokens` -> `max_completion_tokens` when the body said that)."""
    name = field.removeprefix("sampling.")
    return (renames or {}).get(name, name)


@contextlib.contextmanager
def invalid_fields(renames: Mapping[str, str] | None = None) -> Iterator[None]:
    """An `InvalidRequestError` raised inside becomes a 400 `ApiError` naming the body's field
    (`renames` is read when the error happens: a builder may still be filling it in)."""
    try:
        yield
    except InvalidRequestError as exc:
        raise ApiError.from_request_error(RequestError.invalid(exc), renames) from None


def loc_param(loc: Sequence[int | str]) -> str | None:
    """A pydantic error location as a field path (`messages[0].content`): the leading "body"
    dropped, and cut at pydantic's union-member tags (`str`, `list[int]`, `TextPart`), which
    name a type, not a field. None for the body as a whole."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if part in _UNION_TAGS or not part.isidentifier() or part[:1].isupper():
            break
        path += f".{part}" if path else part
    return path or None


def validation_error(exc: RequestValidationError) -> ApiError:
    """A body that does not parse: 400 naming the first bad field (a validator's own error
    first: for a union field, pydantic also reports every member the value is not)."""
    errors = exc.errors()
    # a check of ours (a validator's ValueError) says more than a union member's type mismatch
    ours = [e for e in errors if e.get("type") == "value_error"]
    first = (ours or errors or [{}])[0]
    param = loc_param(first.get("loc", ()))
    reason = str(first.get("msg", "invalid request body"))
    message = f"{param}: {reason}" if param else reason
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return ApiError(400, message, param=param, code="invalid_argument")


def http_error(exc: HTTPException) -> ApiError:
    """Starlette's own refusals (no such route, wrong method, unreadable body)."""
    messages = {404: "no such route", 405: "method not allowed for this route"}
    message = messages.get(exc.status_code, str(exc.detail))
    return ApiError(exc.status_code, message, headers=exc.headers)


def install_handlers(app: FastAPI, on_invalid_body: Callable[[Request], None]) -> None:
    """Every error the app answers, in OpenAI's shape. `on_invalid_body` is told of each body
    that does not parse (the metrics count those of the completion routes)."""

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        on_invalid_body(request)
        return validation_error(exc).response()

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return http_error(exc).response()

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
