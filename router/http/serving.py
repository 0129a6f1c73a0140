"""uvicorn serving the HTTP app as a task on the running event loop (never `uvicorn.run`).

Lifecycle: `await start()` binds `host:port` (0: any free port) and returns the bound port ->
serves -> `await stop()`: no new connections, idle ones closed, requests in flight given
`grace_s` (whole seconds: uvicorn's unit) to finish, then cancelled (which aborts their flows on the workers).

Hazards, and what this does about them:
- uvicorn's `serve()` replaces the process's SIGINT / SIGTERM handlers (it restores them when it
  returns), which would take Ctrl-C away from `tandem serve`: `_Server` captures no signal.
- uvicorn answers a port it cannot bind with `sys.exit()` inside its task; a SystemExit in a
  task stops the whole event loop. The socket is therefore bound here first, so a taken port is
  an ordinary OSError from `start()`.
- uvicorn's default logging config would rewrite the process's loggers: `log_config=None`, and
  no access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn's server, leaving the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on host:port; raises OSError naming `http_port` when it
    cannot be bound (a port in use, an address not of this host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"http_port: cannot bind {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(f"http_port: cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return sock


class HttpServer:
    def __init__(self, app: ASGIApp, host: str, port: int, grace_s: int = 1) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._grace_s = grace_s
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Serve; returns the bound port. Raises OSError when the port cannot be bound."""
        sock = _bind(self._host, self._port)
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=self._grace_s,
        )
        self._server = _Server(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises the start-up error
                raise OSError(f"HTTP server on {self._host}:{self._port} did not start")
            if asyncio.get_running_loop().time() > deadline:
                await self.stop()
                raise OSError(f"HTTP server on {self._host}:{self._port} did not start in time")
            await asyncio.sleep(0.01)
        bound = self._server.servers[0].sockets[0].getsockname()
        self.port = int(bound[1])
        return self.port

    async def stop(self) -> None:
        """Graceful: see the module docstring. Idempotent."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self._grace_s + 5.0)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._server, self._task = None, None
