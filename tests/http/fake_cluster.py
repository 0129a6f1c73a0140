"""The real router (gRPC and HTTP doors) over in-process fake workers, on a background event
loop, so tests can use the blocking `openai` and `httpx` clients. No Ray, no model."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer
from tandem.contract.worker_api import PrefillRequest, PrefillResult
from tandem.testing.fake_worker import FakeDelays, FakeWorker

T = TypeVar("T")
FAST = dict(heartbeat_interval_s=0.1, heartbeat_timeout_s=0.3, poll_wait_s=0.2, poll_grace_s=0.3)
MAX_MODEL_LEN = 512


class RecordingWorker(FakeWorker):
    """A fake worker that also keeps every PrefillRequest it was sent."""

    def __init__(self, worker_id: str, **kwargs: Any) -> None:
        super().__init__(worker_id, **kwargs)
        self.requests: list[PrefillRequest] = []

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        self.requests.append(req)
        return await super().prefill(req)


class FakeCluster:
    """`workers`: pool -> worker; none: a router no worker has joined."""

    def __init__(self, workers: dict[str, FakeWorker] | None = None, **config: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        settings = {**FAST, "model_name": "fake", "http_port": 0, **config}
        self.server = RouterServer(
            RouterConfig(max_model_len=MAX_MODEL_LEN, **settings), ByteTokenizer()
        )
        self.run(self.server.start())
        self.workers = workers or {}
        for pool, worker in self.workers.items():
            self.run(self.server.add_worker(worker.worker_id, pool, worker))
        self.base_url = f"http://127.0.0.1:{self.server.http_port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def num_active(self) -> int:
        async def count() -> int:
            return self.server.orchestrator.num_active

        return self.run(count())

    def close(self) -> None:
        self.run(self.server.stop(grace_s=0.1))
        for worker in self.workers.values():
            self.run(worker.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def disaggregated(step_s: float = 0.0) -> dict[str, FakeWorker]:
    return {
        "prefill": RecordingWorker("p0"),
        "decode": RecordingWorker("d0", delays=FakeDelays(step_s=step_s)),
    }
