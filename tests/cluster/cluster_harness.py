"""A LocalCluster on a background event loop, so tests can use the blocking client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from tandem.client import Client
from tandem.cluster import ClusterConfig, LocalCluster

T = TypeVar("T")


class ClusterThread:
    def __init__(self, config: ClusterConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.cluster = LocalCluster(config)
        self.address = self.run(self.cluster.start(), timeout=240)
        self.client = Client(self.address)

    def run(self, coro: Coroutine[Any, Any, T] | Any, timeout: float = 60) -> T:
        """Run a coroutine (or await a Ray ObjectRef) on the cluster's loop."""
        if not asyncio.iscoroutine(coro):
            ref = coro

            async def wait() -> Any:
                return await ref

            coro = wait()
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        import ray

        self.client.close()
        self.run(self.cluster.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        ray.shutdown()  # no Ray processes outlive the test module

    def all_blocks_free(self) -> bool:
        status = self.client.cluster_status()
        return all(
            w.load.free_kv_blocks == w.load.total_kv_blocks for w in status.workers if w.healthy
        )

    def wait_all_free(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.all_blocks_free():
                return True
            time.sleep(0.1)
        return False
