"""Tandem: an LLM serving cluster with separate prefill and decode pools.

`import tandem` stays cheap: the client (and grpc) load on first use of `tandem.Client`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.client import AsyncClient, Client, TandemClientError

__all__ = ["AsyncClient", "Client", "TandemClientError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tandem import client

        return getattr(client, name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
