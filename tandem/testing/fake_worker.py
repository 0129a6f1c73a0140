"""A fast in-process fake of every worker interface, for tests and the router benchmark.

`FakeWorker` implements PrefillWorker, DecodeWorker and ColocatedWorker with the real
contracts: deterministic echo tokens (output i is prompt[i % len(prompt)]), max_tokens /
stop-token / EOS / stop-string finishes, KV blocks allocated for the whole sequence and freed
on finish or abort, a KV lease held by the prefill side until the decode side acks it (or an
abort), one output batch per step for all requests (`tokens_per_step` tokens each), and a
long-poll `next_outputs`. Delays are configurable; zero means no compute at all.

`fail(FailMode.RAISE)` makes every call raise WorkerUnavailableError (a dead actor);
`fail(FailMode.HANG)` makes every call hang (a wedged one). `restart()` is a process that came
back: all requests and leases gone, every block free, calls answered, a new `incarnation`.
Call logs (`prefills`, `starts`, `submits`, `aborts`) let tests check what reached the worker.
"""

from __future__ import annotations

import asyncio
import enum
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.utils.math import cdiv
from router.tasks import cancel_and_wait
from tandem.contract.worker_api import (
    CostModel,
    DecodeRequest,
    LoadSnapshot,
    PrefillRequest,
    PrefillResult,
    SamplingParams,
    StageTimes,
    StepOutput,
    WorkerRejectedError,
    WorkerUnavailableError,
)

_DIRECTORY: weakref.WeakValueDictionary[str, FakeWorker] = weakref.WeakValueDictionary()
_HANDLE_PREFIX = b"fake-kv|"


class FailMode(enum.Enum):
    NONE = "none"
    RAISE = "raise"
    HANG = "hang"


@dataclass(frozen=True)
class FakeDelays:
    prefill_s: float = 0.0  # per request
    prefill_s_per_token: float = 0.0
    step_s: float = 0.0  # per decode step
    tokens_per_step: int = 1


def _default_detok(token_id: int) -> str:
    return chr(token_id) if 32 <= token_id < 127 else ""


@dataclass(eq=False)
class _Seq:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    num_blocks: int
    needs_prefill: bool
    start: float = field(default_factory=time.monotonic)
    outputs: list[int] = field(default_factory=list)
    text: str = ""
    first_step: float | None = None
    awaiting_first: bool = False  # started on a streamed KV handle, first token not yet here


class FakeWorker:
    def __init__(
        self,
        worker_id: str,
        *,
        delays: FakeDelays = FakeDelays(),
        num_blocks: int = 4096,
        block_size: int = 16,
        eos_token_id: int | None = None,
        detok: Callable[[int], str] = _default_detok,
        cost: CostModel | None = None,
        streams_kv: bool = False,
    ) -> None:
        """`streams_kv`: `kv_handle` answers as the prefill starts (else b"")."""
        self.worker_id = worker_id
        self.streams_kv = streams_kv
        self._early: dict[str, asyncio.Future[bytes]] = {}
        self.delays = delays
        self.num_total_blocks = num_blocks
        self.num_free_blocks = num_blocks
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        self._detok = detok
        self._cost = cost or CostModel(
            prefill_s_per_token=delays.prefill_s_per_token,
            prefill_s_per_request=delays.prefill_s,
            decode_step_s=delays.step_s / max(delays.tokens_per_step, 1),
        )
        self._fail = FailMode.NONE
        self.incarnation = 0  # LoadSnapshot.incarnation is its str; `restart()` bumps it
        self._seqs: dict[str, _Seq] = {}
        self._prefilling: dict[str, int] = {}
        self.leases: dict[str, int] = {}  # request id -> blocks held for a KV transfer
        self._aborted: set[str] = set()
        self._outbox: list[StepOutput] = []
        self._ready = asyncio.Event()
        self._work = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self.prefills: list[str] = []
        self.starts: list[str] = []
        self.submits: list[str] = []
        self.aborts: list[str] = []
        _DIRECTORY[worker_id] = self

    # -- failure injection ------------------------------------------------------------------
    def fail(self, mode: FailMode) -> None:
        self._fail = mode

    def restart(self) -> None:
        """Come back as a new process: forget every request and lease, answer calls again."""
        self.incarnation += 1
        for future in self._early.values():  # calls the old process held fail, as on Ray
            if not future.done():
                future.set_exception(WorkerUnavailableError(f"{self.worker_id} restarted"))
        self._early.clear()
        self._aborted.clear()
        self._seqs.clear()
        self._prefilling.clear()
        self.leases.clear()
        self._outbox.clear()
        self.num_free_blocks = self.num_total_blocks
        self._fail = FailMode.NONE

    async def _check_alive(self) -> None:
        if self._fail is FailMode.RAISE:
            raise WorkerUnavailableError(f"{self.worker_id} is dead")
        if self._fail is FailMode.HANG:
            await asyncio.Event().wait()  # forever, until the caller gives up

    # -- prefill ------------------------------------------------------------------------------
    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        await self._check_alive()
        self.prefills.append(req.request_id)
        start = time.monotonic()
        self._prefilling[req.request_id] = len(req.prompt_token_ids)
        handle = _HANDLE_PREFIX + self.worker_id.encode() + b"|" + req.request_id.encode()
        if self.streams_kv:  # leased and handed out before the first token
            self.leases[req.request_id] = self._blocks(len(req.prompt_token_ids))
            self._publish_early(req.request_id, handle)
        try:
            await self._sleep(self._prefill_delay(len(req.prompt_token_ids)))
        finally:
            del self._prefilling[req.request_id]
            self._publish_early(req.request_id, b"")
        seq = _Seq(req.request_id, req.prompt_token_ids, req.sampling_params, 0, False)
        token, reason = self._next_token(seq)
        times = StageTimes(prefill_queue=0.0, prefill=time.monotonic() - start)
        if req.request_id in self._aborted:
            reason = "abort"
        if reason is None:
            if not self.streams_kv:  # (streamed: leased at the start, maybe acked already)
                self.leases[req.request_id] = self._blocks(len(req.prompt_token_ids))
        else:
            handle = b""
            self.leases.pop(req.request_id, None)
        return PrefillResult(
            req.request_id,
            token,
            self._detok(token),
            reason is not None,
            reason,
            handle,
            len(req.prompt_token_ids),
            0,
            None,
            times,
        )

    async def kv_handle(self, request_id: str) -> bytes:
        await self._check_alive()
        if not self.streams_kv:
            return b""
        future = self._early.setdefault(request_id, asyncio.get_running_loop().create_future())
        try:
            return await future
        finally:
            self._early.pop(request_id, None)

    def _publish_early(self, request_id: str, handle: bytes) -> None:
        """Answers a `kv_handle` call (made before or after; the first answer stands)."""
        if not self.streams_kv or (not handle and request_id not in self._early):
            return
        future = self._early.setdefault(request_id, asyncio.get_running_loop().create_future())
        if not future.done():
            future.set_result(handle)

    def _prefill_delay(self, num_tokens: int) -> float:
        return self.delays.prefill_s + self.delays.prefill_s_per_token * num_tokens

    def _ack_lease(self, request_id: str) -> None:
        self.leases.pop(request_id, None)

    # -- decode / colocated -------------------------------------------------------------------
    async def start(self, req: DecodeRequest) -> None:
        await self._check_alive()
        self.starts.append(req.request_id)
        waiting = self._seqs.get(req.request_id)
        if waiting is not None and waiting.awaiting_first and req.first_token_id is not None:
            waiting.outputs.append(req.first_token_id)  # a streamed start's second half
            waiting.text, waiting.awaiting_first = req.first_text, False
            self._work.set()
            return
        if not req.kv_handle.startswith(_HANDLE_PREFIX):
            raise WorkerRejectedError(f"unreadable KV handle for {req.request_id}")
        seq = self._admit(
            req.request_id, req.prompt_token_ids, req.sampling_params, needs_prefill=False
        )
        if req.first_token_id is None:
            seq.awaiting_first = True
        else:
            seq.outputs.append(req.first_token_id)
            seq.text = req.first_text
        source = _DIRECTORY.get(req.kv_handle.split(b"|")[1].decode())
        if source is not None:
            source._ack_lease(req.request_id)  # the KV "arrived"

    async def submit(self, req: PrefillRequest) -> None:
        await self._check_alive()
        self.submits.append(req.request_id)
        self._admit(req.request_id, req.prompt_token_ids, req.sampling_params, needs_prefill=True)

    def _admit(
        self, request_id: str, prompt: tuple[int, ...], params: SamplingParams, needs_prefill: bool
    ) -> _Seq:
        assert params.max_tokens is not None, "the router caps max_tokens"
        need = self._blocks(len(prompt) + params.max_tokens)
        if need > self.num_free_blocks:
            raise WorkerRejectedError(f"needs {need} KV blocks, {self.num_free_blocks} free")
        if request_id in self._seqs:
            raise WorkerRejectedError(f"request {request_id} is already running")
        self.num_free_blocks -= need
        seq = _Seq(request_id, prompt, params, need, needs_prefill)
        self._seqs[request_id] = seq
        self._work.set()
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(
                self._step_loop(), name=f"fake-{self.worker_id}"
            )
        return seq

    async def next_outputs(self, max_wait_s: float = 1.0) -> list[StepOutput]:
        await self._check_alive()
        if not self._outbox:
            try:
                await asyncio.wait_for(self._ready.wait(), max_wait_s)
            except asyncio.TimeoutError:
                return []
            await self._check_alive()
        outputs, self._outbox = self._outbox, []
        self._ready.clear()
        return outputs

    async def abort(self, request_id: str) -> None:
        await self._check_alive()
        self.aborts.append(request_id)
        self._aborted.add(request_id)
        self.leases.pop(request_id, None)
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.num_free_blocks += seq.num_blocks
            self._emit([StepOutput(request_id, (), finished=True, finish_reason="abort")])

    # -- the engine step ----------------------------------------------------------------------
    async def _step_loop(self) -> None:
        while True:
            if not self._seqs:
                self._work.clear()
                await self._work.wait()
            pending = sum(len(s.prompt) for s in self._seqs.values() if s.needs_prefill)
            await self._sleep(
                self.delays.step_s + (self._prefill_delay(pending) if pending else 0.0)
            )
            if self._fail is not FailMode.NONE:
                continue  # a dead worker produces nothing
            self._emit(
                [self._step(seq) for seq in list(self._seqs.values()) if not seq.awaiting_first]
            )

    def _step(self, seq: _Seq) -> StepOutput:
        now = time.monotonic()
        seq.first_step = seq.first_step or now
        count = 1 if seq.needs_prefill else self.delays.tokens_per_step
        seq.needs_prefill = False
        new: list[int] = []
        reason = None
        for _ in range(count):
            token, reason = self._next_token(seq)
            new.append(token)
            if reason is not None:
                break
        text = "".join(self._detok(t) for t in new)
        if reason is None:
            return StepOutput(seq.request_id, tuple(new), text)
        del self._seqs[seq.request_id]
        self.num_free_blocks += seq.num_blocks
        times = StageTimes(
            kv_transfer=0.0, decode_queue=seq.first_step - seq.start, decode=now - seq.first_step
        )
        return StepOutput(seq.request_id, tuple(new), text, True, reason, (), times)

    def _next_token(self, seq: _Seq) -> tuple[int, str | None]:
        """Echo the prompt; return the token and the finish reason it causes, if any."""
        token = seq.prompt[len(seq.outputs) % len(seq.prompt)]
        seq.outputs.append(token)
        seq.text += self._detok(token)
        p = seq.params
        if len(seq.outputs) >= p.min_tokens:
            if token in p.stop_token_ids or (token == self.eos_token_id and not p.ignore_eos):
                return token, "stop"
            if any(s in seq.text for s in p.stop):
                return token, "stop"
        if p.max_tokens is not None and len(seq.outputs) >= p.max_tokens:
            return token, "length"
        return token, None

    def _emit(self, outputs: list[StepOutput]) -> None:
        if outputs:
            self._outbox.extend(outputs)
            self._ready.set()

    # -- load ---------------------------------------------------------------------------------
    async def load(self) -> LoadSnapshot:
        await self._check_alive()
        return LoadSnapshot(
            num_queued_prefill_tokens=sum(self._prefilling.values()),
            num_running=len(self._seqs),
            num_waiting=0,
            num_free_blocks=self.num_free_blocks,
            num_total_blocks=self.num_total_blocks,
            block_size=self.block_size,
            tier_blocks={"hbm": self.num_total_blocks - self.num_free_blocks},
            incarnation=str(self.incarnation),
        )

    async def cost_model(self) -> CostModel:
        await self._check_alive()
        return self._cost

    @property
    def num_running(self) -> int:
        return len(self._seqs)

    def _blocks(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    @staticmethod
    async def _sleep(seconds: float) -> None:
        await asyncio.sleep(seconds)  # sleep(0) still yields, as a real step would

    async def close(self) -> None:
        await cancel_and_wait(self._loop_task)
        self._loop_task = None
