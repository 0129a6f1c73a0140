"""The HTTP body limit: requests larger than `RouterConfig.max_message_bytes` get 413.

`BodyLimit` is a pure ASGI middleware (it never buffers the body): a `Content-Length` over the
limit is answered 413 before anything is read; a body that turns out larger while it is read
(chunked, or a lying Content-Length) makes the wrapped `receive` raise a 413 `HTTPException`,
which FastAPI re-raises from its body parsing and the app's handlers answer in OpenAI's shape.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.http.errors import ApiError


def _too_large(max_bytes: int) -> str:
    return f"the request body is larger than the {max_bytes} bytes this server accepts"


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = ApiError(413, _too_large(self.max_bytes), code="request_too_large")
            await error.response()(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, _too_large(self.max_bytes))
            return message

        await self.app(scope, limited, send)
