"""API keys on the router's front doors: one shared key, sent as `authorization: Bearer <key>`.

- `authorized(header_value, api_key)`: the check both doors use (the gRPC interceptor below and
  the HTTP app). Constant time: both sides are hashed (SHA-256) and the fixed-size digests
  compared with `hmac.compare_digest`, so the time taken depends on neither the key's content
  nor its length (only on the length of what the caller sent, which the caller knows).
- `ApiKeyInterceptor`: the gRPC door. Every method needs the key except
  `/grpc.health.v1.Health/*` (load balancers and Kubernetes probe health without keys); server
  reflection needs it too (it lists the services, so it is not for anonymous callers).
- `load_api_key(value, file, env)`: the key from a literal, a file or an environment variable.

Hazards: the key travels in clear text on a plaintext port; across an untrusted network turn TLS
on as well (`RouterConfig.tls_cert_file`). The key must never reach a log, an error message or a
repr: `RouterConfig.api_key` is excluded from its repr, and no message here quotes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc

from engine.errors import TandemError
from router.config import api_key_problem

log = logging.getLogger(__name__)
AUTHORIZATION = "authorization"  # the metadata key (gRPC) / header (HTTP)
SCHEME = "bearer"  # compared case-insensitively, as RFC 9110 says for auth schemes
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)  # methods callable without a key
MISSING_KEY = "authorization: missing API key"
INVALID_KEY = "authorization: invalid API key"
HINT = "send 'authorization: Bearer <key>'"


class ApiKeyError(TandemError, ValueError):
    """The API key cannot be read or is not a valid key. `option` is where it came from:
    "api_key", "api_key_file" or "api_key_env" (callers map it to their flag or spec field).
    The message never contains the key."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _matches(header_value: str, key_digest: bytes) -> bool:
    """Whether `header_value` is `Bearer <key>` (one space), `key_digest` being the key's digest.
    Both parts are always evaluated: no early return reveals which one failed."""
    scheme, space, token = header_value.partition(" ")
    scheme_ok = space == " " and scheme.lower() == SCHEME
    token_ok = hmac.compare_digest(_digest(token), key_digest)
    return scheme_ok & token_ok


def authorized(header_value: str | None, api_key: str | None) -> bool:
    """True when `api_key` is None (auth off), else only for `Bearer <api_key>`: the scheme in
    any case, one space, then exactly the key (compared in constant time)."""
    if api_key is None:
        return True
    if header_value is None:
        return False
    return _matches(header_value, _digest(api_key))


# ------------------------------------------------------------------ the gRPC door


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without `authorization: Bearer <key>` UNAUTHENTICATED ("authorization:
    missing API key" / "authorization: invalid API key"), except the health service's.

    Covers every method the server has, reflection included, and unknown methods too (a caller
    without the key gets UNAUTHENTICATED, never UNIMPLEMENTED: it learns nothing of the API).
    Goes first among the interceptors: a refused call never reaches the others or the servicer,
    and its request bytes are never parsed. The refusal is a stream-stream handler whatever the
    method's kind (on the wire every gRPC call is a stream; gRPC picks the server-side shape from
    the handler), so unary and streaming methods are refused the same way without reading the
    request. A call carrying several `authorization` entries is invalid."""

    def __init__(self, api_key: str) -> None:
        problem = api_key_problem(api_key)
        if problem is not None:
            raise ApiKeyError("api_key", problem)
        self._key_digest = _digest(api_key)

    def refusal(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
    ) -> str | None:
        """Why a call of `method` with `metadata` is refused (the status details); None: let in."""
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return None
        values = [v for k, v in metadata or () if k == AUTHORIZATION]
        if not values:
            return MISSING_KEY
        value = values[0]
        if len(values) != 1 or not isinstance(value, str):
            return INVALID_KEY
        return None if _matches(value, self._key_digest) else INVALID_KEY

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        details = self.refusal(method, handler_call_details.invocation_metadata)
        if details is None:
            return await continuation(handler_call_details)
        return _refusing_handler(method, details)


def _refusing_handler(method: str, details: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call UNAUTHENTICATED without reading its request."""

    async def refuse(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        log.info("%s from %s refused: %s", method, context.peer(), details)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"{details}; {HINT}")

    return grpc.stream_stream_rpc_method_handler(refuse)


# ------------------------------------------------------------------ reading a key


def load_api_key(value: str | None, file: str | None, env: str | None) -> str | None:
    """The API key from at most one source: `value` (a literal), `file` (a path; its content,
    stripped) or `env` (an environment variable's name; its value, stripped). None when all
    three are None (auth off).

    Raises `ApiKeyError` naming the option: more than one source, an unreadable or empty file,
    an unset or empty variable, or a key `RouterConfig` would refuse (< 16 characters, or not
    printable ASCII without spaces). A file readable by group or others is used, with a
    warning: Kubernetes mounts Secrets 0644 by default, so refusing would break that setup."""
    given = [
        (option, source)
        for option, source in (("api_key", value), ("api_key_file", file), ("api_key_env", env))
        if source is not None
    ]
    if not given:
        return None
    if len(given) > 1:
        names = " and ".join(option for option, _ in given)
        raise ApiKeyError(given[1][0], f"give one source of the API key, not {names}")
    option, source = given[0]
    key = source if option == "api_key" else _read(option, source)
    problem = api_key_problem(key)
    if problem is not None:
        raise ApiKeyError(option, problem)
    return key


def _read(option: str, source: str) -> str:
    key = _read_file(source) if option == "api_key_file" else _read_env(source)
    if not key:
        where = f"{source} is empty" if option == "api_key_file" else f"${source} is empty"
        raise ApiKeyError(option, where)
    return key


def _read_file(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ApiKeyError("api_key_file", f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ApiKeyError("api_key_file", f"{path} is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "api_key_file: %s is accessible to group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return text.strip()


def _read_env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise ApiKeyError("api_key_env", f"${name} is not set")
    return value.strip()
