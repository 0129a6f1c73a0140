"""The router of a launched cluster: a detached async Ray actor on the head node that owns
`router.server.RouterServer` (the client port) on the actor's own event loop.

Why an actor and not the launching process: `tandem launch` returns once the cluster serves, and
`tandem down` (another process) must find and stop the router by name. The actor is async so
the gRPC server, the heartbeats and the workers' long polls all share its one event loop.

Lifecycle: created by `tandem.launch` -> `start(...)` (binds the port, registers every worker by
actor name; raises if the tokenizer is not on the head) -> serves -> `stop()` (graceful: health
NOT_SERVING, in-flight streams end) -> killed by `tandem down`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer, HfTokenizer, Tokenizer

ROUTER_ACTOR_NAME = "tandem-router"


@dataclass(frozen=True)
class RouterWorker:
    """A worker the router registers: its id, pool, actor name and metrics target."""

    worker_id: str
    pool: str
    actor_name: str
    metrics_target: str | None


def router_tokenizer(model_path: str) -> Tokenizer:
    """The checkpoint's tokenizer, read on the head node. A shape-only preset (a directory with
    config.json and no tokenizer files) gets the byte tokenizer (token-id prompts only).

    Raises FileNotFoundError naming `model.path` when the directory is not on this node: the
    router tokenizes text, so a silent byte fallback would send the model wrong token ids."""
    path = Path(model_path)
    if (path / "tokenizer.json").is_file():
        return HfTokenizer(path)
    if (path / "config.json").is_file():
        return ByteTokenizer()
    raise FileNotFoundError(
        f"model.path: {model_path} is not on the head node, where the router tokenizes; "
        "copy the checkpoint (its tokenizer files at least) to the same path there"
    )


class RouterActor:
    """Ray actor class (decorated by the caller). Every method runs on the actor's event loop."""

    def __init__(self) -> None:
        self.server: RouterServer | None = None

    async def start(
        self, config: RouterConfig, model_path: str, workers: list[RouterWorker], namespace: str
    ) -> dict[str, str | None]:
        """Serve and register `workers`; returns {"address", "metrics_target"}.

        `config.api_key` (the spec's key, read by `tandem launch`) comes in this call's arguments,
        not in the actor's creation options, which Ray keeps for restarts; never log `config`
        through anything but its repr (which leaves the key out)."""
        import ray

        server = RouterServer(config, router_tokenizer(model_path))
        await server.start()
        self.server = server
        for w in workers:
            handle = ray.get_actor(w.actor_name, namespace=namespace)
            await server.add_worker(w.worker_id, w.pool, _ray_worker(handle), w.metrics_target)
        target = server.metrics_endpoint.target if server.metrics_endpoint is not None else None
        return {"address": server.address, "metrics_target": target}

    async def serving(self) -> bool:
        return self.server is not None and self.server.registry.serving

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def node_id(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())


def _ray_worker(handle: Any) -> Any:
    from tandem.cluster import RayWorker

    return RayWorker(handle)
