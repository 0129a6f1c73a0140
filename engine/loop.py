"""EngineLoop: an LLMEngine driven by one thread, for workers that serve many callers.

Each iteration has three stages:
  1. run queued commands (`call(fn)`: add, abort, stats, transfer bookkeeping) in order;
  2. `before_step()` hook (e.g. poll KV receivers and senders; never blocks);
  3. if anything is unfinished: `outputs = engine.step()` and `on_outputs(outputs)`;
     otherwise wait for the next command (up to `idle_wait_s`, so hooks still run; up to
     _HOOK_POLL_S while `has_work()`, e.g. KV transfers landing: a blocking wait, never a
     spin, since a spinning loop holds the GIL that the transports' threads need to finish).

Step listeners (`on_step(callback)`, for metrics) hear `callback(num_batched_tokens, seconds)`
after every step, on this thread, before `on_outputs`: keep them cheap. A listener that raises
is logged and dropped, never fatal to the loop.

Every touch of the engine happens on this thread, so the engine needs no locks. A failure of
`step()` (a device error) is fatal: the loop stops, records the error, fails every pending
command, and `healthy` turns False; it never dies silently.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from engine.engine import LLMEngine
from engine.outputs import RequestOutput

T = TypeVar("T")
log = logging.getLogger(__name__)
_HOOK_POLL_S = 0.0002  # between `before_step()` calls while only the hooks have work


class EngineLoopError(RuntimeError):
    """The loop has stopped after a fatal error; `__cause__` holds it."""


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_outputs: Callable[[list[RequestOutput]], None],
        before_step: Callable[[], None] | None = None,
        has_work: Callable[[], bool] | None = None,
        idle_wait_s: float = 0.005,
        name: str = "engine-loop",
    ) -> None:
        self.engine = engine
        self._on_outputs = on_outputs
        self._before_step = before_step or (lambda: None)
        self._has_work = has_work or (lambda: False)
        self._idle_wait_s = idle_wait_s
        self._commands: queue.Queue[tuple[Callable[[LLMEngine], Any], Future] | None] = (
            queue.Queue()
        )
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        self.num_steps = 0
        self._step_listeners: list[Callable[[int, float], None]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def healthy(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def on_step(self, callback: Callable[[int, float], None]) -> None:
        """Call `callback(num_batched_tokens, step_seconds)` after every step (loop thread)."""
        self._step_listeners.append(callback)

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._commands.put(None)
        self._thread.join(timeout)

    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run `fn(engine)` on the loop thread between steps; its result or error in the future."""
        future: Future[T] = Future()
        if self.error is not None or self._stopping.is_set():
            future.set_exception(EngineLoopError("the engine loop has stopped"))
            return future
        self._commands.put((fn, future))
        return future

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                busy = self.engine.has_unfinished()
                self._run_commands(
                    None if busy else _HOOK_POLL_S if self._has_work() else self._idle_wait_s
                )
                self._before_step()
                if self.engine.has_unfinished():
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    self.num_steps += 1
                    self._notify_step(time.perf_counter() - started)
                    if outputs:
                        self._on_outputs(outputs)
        except BaseException as exc:  # a device or engine failure: fatal, loudly
            log.exception("engine loop failed")
            self.error = exc
        finally:
            self._fail_pending()

    def _notify_step(self, seconds: float) -> None:
        num_tokens = self.engine.last_step_num_batched_tokens
        for callback in list(self._step_listeners):
            try:
                callback(num_tokens, seconds)
            except Exception:  # a metrics hook must not take the engine down
                log.exception("step listener %r failed; dropping it", callback)
                self._step_listeners.remove(callback)

    def _run_commands(self, wait_s: float | None) -> None:
        """Runs the queued commands, waiting up to `wait_s` for the first (None: not at all)."""
        try:
            item = (
                self._commands.get(timeout=wait_s)
                if wait_s is not None
                else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        while item is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except Exception as exc:  # the caller's error (e.g. bad input): theirs, not ours
                    future.set_exception(exc)
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending(self) -> None:
        cause = self.error or EngineLoopError("the engine loop has stopped")
        while True:
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[1].done():
                item[1].set_exception(EngineLoopError(str(cause)))
