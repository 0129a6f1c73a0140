"""The metrics plumbing every component shares: the latency buckets, and serving one process component's CollectorRegistry over HTTP for Prometheus.

Every Tandem process (router, each worker) owns a dedicated `CollectorRegistry` (never the
global default, so tests can run several components in one process) and serves it on its own
`host:port`, 127.0.0.1 unless told otherwise. `port=0` picks a free port: prometheus-client
>= 0.20 returns the bound server, whose port we read back; with an older one (which returns
nothing) pass an explicit port.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

# Fine enough for millisecond decode steps, wide enough for minutes-long requests.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


@dataclass
class MetricsEndpoint:
    """A running metrics HTTP server. `target` is what Prometheus scrapes ("host:port")."""

    host: str
    port: int
    _server: Any = None

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def close(self) -> None:
        """Stop serving (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_registry(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> MetricsEndpoint:
    """Start a daemon-thread HTTP server for `registry` on host:port (0: any free port).

    Raises OSError when the port is taken. The server answers `/metrics` (any path, in fact).
    """
    if host in ("0.0.0.0", "::", ""):
        raise ValueError(f"metrics host {host!r} binds every interface; name one address")
    result = start_http_server(port, addr=host, registry=registry)
    if isinstance(result, tuple):  # prometheus-client >= 0.20: (server, thread)
        server = result[0]
        return MetricsEndpoint(host, int(server.server_port), server)
    if port == 0:  # an old client gave no handle back: we cannot learn the port it bound
        raise OSError("this prometheus-client cannot report the bound port; pass an explicit port")
    return MetricsEndpoint(host, port, None)
