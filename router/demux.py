"""One task per decode (or colocated) worker: long-poll its step outputs, route them per request.

Loop: `next_outputs(poll_wait_s)` -> put each StepOutput on its request's queue (outputs for
unknown ids, e.g. after an abort, are dropped). A call that raises or does not return within
`poll_wait_s + grace_s` means the worker is broken: it is marked unhealthy and every open
stream on it receives a `WorkerUnavailableError` at once (so clients learn within seconds,
not at their deadline). The registry's down notifications do the same for hangs its
heartbeats notice first. Polling then continues with a back-off, in case the worker recovers.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from router.registry import WorkerRegistry
from router.tasks import cancel_and_wait, within
from tandem.contract.worker_api import StepOutput, WorkerUnavailableError

log = logging.getLogger(__name__)

StreamItem = StepOutput | BaseException


class StepDemux:
    def __init__(
        self,
        worker_id: str,
        worker: Any,
        registry: WorkerRegistry,
        poll_wait_s: float = 1.0,
        grace_s: float = 1.0,
        backoff_s: float = 0.2,
    ) -> None:
        self.worker_id = worker_id
        self._worker = worker
        self._registry = registry
        self._poll_wait_s = poll_wait_s
        self._grace_s = grace_s
        self._backoff_s = backoff_s
        self._queues: dict[str, asyncio.Queue[StreamItem]] = {}
        self._task: asyncio.Task[None] | None = None

    def open(self, request_id: str, queue: asyncio.Queue[StreamItem]) -> None:
        """Route this request's outputs to `queue` (open it before `start`/`submit`)."""
        assert request_id not in self._queues, f"stream {request_id} already open"
        self._queues[request_id] = queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    @property
    def num_open(self) -> int:
        return len(self._queues)

    def fail_all(self, reason: str) -> None:
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            queue.put_nowait(WorkerUnavailableError(f"worker {self.worker_id}: {reason}"))

    async def _poll(self) -> list[StepOutput]:
        coro = self._worker.next_outputs(self._poll_wait_s)
        return list(await within(coro, self._poll_wait_s + self._grace_s))

    def _route(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _broken(self, reason: str) -> None:
        self._registry.mark_unhealthy(self.worker_id, reason)
        self.fail_all(reason)

    def _incarnation(self) -> str | None:
        """The worker process the registry last saw (router.registry, Restarts)."""
        try:
            return self._registry.get(self.worker_id).incarnation
        except KeyError:
            return None

    async def _run_until_broken(self) -> None:
        while True:
            polled = self._incarnation()
            try:
                outputs = await self._poll()
            except asyncio.TimeoutError:
                self._broken("next_outputs did not return in time")
                return
            except Exception as exc:  # the worker (or its transport) failed as a whole
                if self._incarnation() != polled:
                    # Hazard: a poll sent to the old process of a restarted worker can fail
                    # after a heartbeat already re-admitted the new one; the registry failed
                    # the old process's streams then, and the new one's must not fail now.
                    return
                self._broken(f"next_outputs failed: {exc!r}")
                return
            self._route(outputs)

    async def _loop(self) -> None:
        while True:
            try:
                await self._run_until_broken()
            except Exception:  # a bug here must not silently stop every stream
                log.exception("demux %s crashed; restarting", self.worker_id)
                self.fail_all("router demultiplexer crashed")
            await asyncio.sleep(self._backoff_s)

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"demux-{self.worker_id}"
        )

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
