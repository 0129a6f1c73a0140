"""Continuous-batching scheduler (vLLM-v1 style): a token budget per step, chunked prefill,
prefix-cache hits, preemption by recompute, priorities and deadlines.

The engine step is three calls:

    out = scheduler.schedule(); result = runner.execute(out); scheduler.update(out, result)

`schedule()` stages:
  1. RUNNING requests in policy order, each asking for `num_tokens - num_computed_tokens`
     tokens (1 in decode, the rest of a prompt in chunked prefill, capped by the budget).
     When the pool is short, the *last* running request in policy order is preempted by
     recompute (blocks freed, `num_computed_tokens = 0`, front of the waiting queue).
  2. Only if nothing was preempted: WAITING / PREEMPTED requests in policy order, while the
     budget, `max_num_seqs` and the pool (minus the watermark) allow; a prefix hit makes
     `num_computed_tokens` jump to the cached length. Admission stops at the first request
     that does not fit (no overtaking: it would starve long prompts).
Speculative decoding (`config.speculation`): a decode row may also get lookahead slots for
draft tokens (engine.spec.lookahead says how many; never at the cost of a preemption: a row
that cannot grow by them runs without), and `update()` appends every token the runner
accepted, checking stop conditions token by token. `num_computed_tokens` then covers the
accepted tokens only and the blocks past it are freed (`KVManager.trim`): the KV of rejected
drafts is released, and prefix-cache hashes never cover a draft.
A request whose structured-output grammar is still compiling (`Request.grammar_ready` False,
like vLLM's WAITING_FOR_FSM) is passed over in both stages, holding nothing new, while the
others go on; the engine finishes one whose compilation failed.

Overlap scheduling splits `update()` in two: `launched(out)` right after the step is enqueued
(fed tokens count as computed; a sampling row has a token in flight, `num_pending_tokens`),
and `complete(rows, result)` once its tokens reach the host. In between the engine schedules
and launches the next step: a decode row then feeds its in-flight token from device memory
(`ScheduledRequest.input_pending`), a row whose in-flight token is its last is not scheduled,
and a preempted request with a token in flight waits for it before re-admission.

Hazards: a request aborted or finished between `schedule()` and `complete()` has its blocks
freed at once; `complete()` skips it. This is safe because every step's KV writes are
enqueued on the one device stream before the next step, which is the first that can reuse
the blocks, is launched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.errors import EngineConfigError, InvalidRequestError
from engine.kv.external import PreemptionSwap
from engine.kv.kv_manager import NO_BLOCKS, ComputedBlocks, KVManager, token_slice
from engine.request import Request, RequestStatus
from engine.scheduler.config import SchedulerConfig
from engine.scheduler.output import RunnerOutput, ScheduledRequest, SchedulerOutput
from engine.scheduler.policy import sort_by_policy

__all__ = ["LaunchedRow", "Scheduler", "SchedulerConfig", "SchedulerStats"]

# A launched step's row: the row, its request, and the request's preemption count at launch.
LaunchedRow = tuple[ScheduledRequest, Request, int]


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for load reports and metrics."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_usable_blocks: int
    num_preemptions_total: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int


class Scheduler:
    """Owns the request queues of one engine; the KVManager owns their blocks.

    Queues are insertion-ordered dicts (O(1) removal by id); each step sorts them by policy
    (O(n log n)). Every exit to a FINISHED_* status frees the request's blocks at once.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVManager,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if kv_manager.block_size != config.block_size:
            raise EngineConfigError(
                f"block_size: scheduler has {config.block_size}, KV manager {kv_manager.block_size}"
            )
        capacity = kv_manager.num_usable_blocks * config.block_size
        if config.max_model_len > capacity:
            raise EngineConfigError(
                f"max_model_len: {config.max_model_len} tokens exceed the KV pool "
                f"({kv_manager.num_usable_blocks} blocks x {config.block_size} = {capacity})"
            )
        self.config = config
        self.kv = kv_manager
        self._clock = clock
        self._requests: dict[str, Request] = {}
        self._running: dict[str, Request] = {}
        self._waiting: dict[str, Request] = {}  # WAITING and PREEMPTED
        self._watermark_blocks = int(config.watermark * kv_manager.num_usable_blocks)
        self.swap: PreemptionSwap | None = None
        self._num_preemptions_total = 0
        self._gone: list[str] = []  # left the running batch since the last schedule()
        self.num_draft_tokens_total = 0
        self.num_accepted_tokens_total = 0

    # ------------------------------------------------------------ requests

    def add_request(self, request: Request) -> None:
        """Queue a new WAITING request. Raises InvalidRequestError on a duplicate id or a
        prompt that is empty or longer than `max_model_len`."""
        if request.request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already queued")
        if not 0 < request.num_prompt_tokens <= self.config.max_model_len:
            raise InvalidRequestError(
                "prompt_token_ids",
                f"{request.num_prompt_tokens} tokens; must be in [1, {self.config.max_model_len}]",
            )
        assert request.status is RequestStatus.WAITING and not request.block_ids
        self._requests[request.request_id] = request
        self._waiting[request.request_id] = request

    def add_running(self, request: Request) -> None:
        """Join a request whose first `num_computed_tokens` already have KV in its blocks (its
        prompt's KV arrived from a prefill worker) straight into the running batch."""
        if request.request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request.request_id!r} is already queued")
        assert (
            request.block_ids
            and request.num_computed_tokens <= len(request.block_ids) * self.config.block_size
        )
        request.status = RequestStatus.RUNNING
        self._requests[request.request_id] = request
        self._running[request.request_id] = request

    def abort(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort requests now (blocks freed at once); unknown or finished ids are ignored."""
        aborted = []
        for request_id in request_ids:
            request = self.finish(request_id, RequestStatus.FINISHED_ABORTED)
            if request is not None:
                aborted.append(request)
        return aborted

    def finish(
        self, request_id: str, status: RequestStatus, stop_reason: int | str | None = None
    ) -> Request | None:
        """End a request with a FINISHED_* status (e.g. a stop string the engine found):
        frees its blocks and drops it from the queues. None if the id is unknown."""
        assert status.finished, f"finish() needs a FINISHED_* status, got {status}"
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if self._running.pop(request_id, None) is not None:
            self._gone.append(request_id)
        self._waiting.pop(request_id, None)
        if request.num_swapped_tokens and self.swap is not None:
            self.swap.discard(request_id)
            request.num_swapped_tokens = 0
        request.status = status
        self._release_blocks(request)
        request.stop_reason = stop_reason
        return request

    def waiting_requests(self) -> list[Request]:
        """WAITING and PREEMPTED requests, in no particular order (a snapshot)."""
        return list(self._waiting.values())

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting),
            num_free_blocks=self.kv.num_free_blocks,
            num_usable_blocks=self.kv.num_usable_blocks,
            num_preemptions_total=self._num_preemptions_total,
            prefix_queried_tokens=self.kv.prefix_queried_tokens,
            prefix_hit_tokens=self.kv.prefix_hit_tokens,
        )

    # ------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work; allocates slots (and may preempt). See the module doc."""
        now = self._clock()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        budget = self._schedule_running(now, budget, scheduled, preempted)
        if not preempted:
            self._schedule_waiting(now, budget, scheduled)
        gone, self._gone = self._gone, []
        return SchedulerOutput(
            scheduled=scheduled,
            preempted_ids=[r.request_id for r in preempted],
            num_batched_tokens=sum(s.num_tokens + s.num_lookahead for s in scheduled),
            finished_ids=gone,
        )

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to feed this step: all that remain, or a chunk; 0 if it must wait."""
        remaining = request.num_tokens + request.num_pending_tokens - num_computed
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _schedule_running(
        self,
        now: float,
        budget: int,
        scheduled: list[ScheduledRequest],
        preempted: list[Request],
    ) -> int:
        queue = sort_by_policy(self._running.values(), now, self.config.starvation_timeout_s)
        speculate = self._speculation_active(len(queue))
        i = 0
        while i < len(queue) and budget > 0:
            request = queue[i]
            n = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if n == 0 or not request.grammar_ready or self._ends_with_pending(request):
                i += 1
                continue
            if self.kv.num_blocks_for(request.num_computed_tokens + n) > len(request.block_ids):
                # Most decode steps fit the last block; only growth needs room (or preemption).
                if not self._make_room(queue, i, n, preempted):
                    break  # the request preempted itself: everything after it already went
                self.kv.allocate_slots(request, n)
            lookahead = (
                self._reserve_lookahead(request, n, budget - n, len(queue) - i - 1)
                if speculate
                else 0
            )
            scheduled.append(self._scheduled(request, n, now, lookahead))
            budget -= n + lookahead
            i += 1
        self._running = {r.request_id: r for r in queue}
        if preempted:  # to the front of the waiting queue, in policy order
            rest = self._waiting
            self._waiting = {r.request_id: r for r in reversed(preempted)}
            self._waiting.update(rest)
        return budget

    def _ends_with_pending(self, request: Request) -> bool:
        """Its token in flight is its last (max_tokens or max_model_len): nothing to schedule;
        `complete()` finishes it."""
        pending = request.num_pending_tokens
        return pending > 0 and self._at_length_limit(request, pending)

    def _at_length_limit(self, request: Request, pending: int = 0) -> bool:
        """Whether `request`, with `pending` more tokens, has all `max_tokens` outputs or fills
        `max_model_len`."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and request.num_output_tokens + pending >= max_tokens:
            return True
        return request.num_tokens + pending >= self.config.max_model_len

    def _speculation_active(self, num_running: int) -> bool:
        policy = self.config.speculation
        return policy is not None and policy.active(num_running)

    def speculation_active(self) -> bool:
        """Whether the next `schedule()` may give the running requests draft slots."""
        return self._speculation_active(len(self._running))

    def _reserve_lookahead(self, request: Request, n: int, budget_left: int, num_after: int) -> int:
        """Slots for draft tokens after a decode row's token, allocated here where they fit
        while leaving a block for each of the `num_after` rows still to schedule (0 otherwise):
        speculation never makes another request wait or be preempted."""
        policy = self.config.speculation
        decode = n == 1 and request.num_output_tokens > 0
        if (
            policy is None
            or not decode
            or request.grammar is not None
            or request.hold_kv
            or request.num_pending_tokens  # drafts need its newest token on the host
        ):
            return 0
        k = policy.lookahead(request, budget_left, self.config.max_model_len)
        if k == 0 or not self.kv.can_allocate_slots(request, n + k, NO_BLOCKS, num_after):
            return 0
        self.kv.allocate_slots(request, n + k)
        return k

    def _make_room(
        self, queue: list[Request], i: int, num_new_tokens: int, preempted: list[Request]
    ) -> bool:
        """Preempt from the tail of `queue` until `queue[i]` fits; False if it went itself."""
        request = queue[i]
        while not self.kv.can_allocate_slots(request, num_new_tokens):
            victim = queue.pop()
            if victim is request and i == 0:
                raise RuntimeError(
                    f"request {request.request_id!r} alone needs more KV blocks than the pool "
                    f"has ({self.kv.num_usable_blocks}); the engine must reject it up front"
                )
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def attach_swap(self, swap: PreemptionSwap) -> None:
        """Preempt by swapping computed KV out (and back at re-admission) instead of recompute."""
        self.swap = swap

    def _preempt(self, request: Request) -> None:
        request.num_swapped_tokens = 0
        if self.swap is not None and request.num_computed_tokens > 0:
            computed_blocks = request.block_ids[
                : self.kv.num_blocks_for(request.num_computed_tokens)
            ]
            if self.swap.swap_out(request.request_id, computed_blocks):
                request.num_swapped_tokens = request.num_computed_tokens
        self.kv.free(request)
        self._gone.append(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions_total += 1

    def _schedule_waiting(self, now: float, budget: int, scheduled: list[ScheduledRequest]) -> None:
        if not self._waiting or len(self._running) >= self.config.max_num_seqs:
            return
        queue = sort_by_policy(self._waiting.values(), now, self.config.starvation_timeout_s)
        for request in queue:
            if budget == 0 or len(self._running) >= self.config.max_num_seqs:
                break
            if not request.grammar_ready or request.num_pending_tokens:
                continue  # compiling, or preempted with a token in flight: not a blocking head
            n = self._admit(request, budget)
            if n == 0:
                break  # no overtaking: the head waits for room
            del self._waiting[request.request_id]
            self._running[request.request_id] = request
            scheduled.append(self._scheduled(request, n, now))
            budget -= n

    def _admit_swapped(self, request: Request, budget: int, reserved: int) -> int:
        """Re-admit a swapped-out request: blocks for its KV and next chunk, KV copied back."""
        swapped = request.num_swapped_tokens
        n = self._num_new_tokens(request, swapped, budget)
        if n == 0 or not self.kv.can_allocate_slots(request, swapped + n, NO_BLOCKS, reserved):
            return 0
        self.kv.allocate_slots(request, swapped + n)
        assert self.swap is not None
        self.swap.swap_in(request.request_id, request.block_ids[: self.kv.num_blocks_for(swapped)])
        request.num_computed_tokens, request.num_swapped_tokens = swapped, 0
        request.status = RequestStatus.RUNNING
        return n

    def _admit(self, request: Request, budget: int) -> int:
        """Allocate a waiting request's first chunk; the number of tokens, or 0 if no room."""
        if request.num_swapped_tokens:
            return self._admit_swapped(
                request, budget, self._watermark_blocks if self._running else 0
            )
        computed: ComputedBlocks = NO_BLOCKS
        if self.config.enable_prefix_caching:
            computed = self.kv.get_computed_blocks(request)
        n = self._num_new_tokens(request, computed.num_tokens, budget)
        # The watermark only protects running requests; with none, admit whatever fits.
        reserved = self._watermark_blocks if self._running else 0
        if n == 0 or not self.kv.can_allocate_slots(request, n, computed, reserved):
            return 0
        request.num_computed_tokens = self.kv.allocate_slots(request, n, computed)
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = request.num_computed_tokens
        request.status = RequestStatus.RUNNING
        return n

    @staticmethod
    def _scheduled(request: Request, n: int, now: float, lookahead: int = 0) -> ScheduledRequest:
        if request.first_scheduled_time is None:  # the end of its queueing, for stage timings
            request.first_scheduled_time = now
        start = request.num_computed_tokens
        known = min(start + n, request.num_tokens)
        pending = start + n - known  # the token in flight, fed from device memory
        assert pending <= 1, "only the newest token can be in flight"
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=token_slice(request, start, known) + [0] * pending,
            start_position=start,
            block_ids=list(request.block_ids),
            sample=start + n == request.num_tokens + request.num_pending_tokens,
            sampling_params=request.sampling_params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            grammar=request.grammar,
            num_lookahead=lookahead,
            input_pending=pending > 0,
        )

    # -------------------------------------------------------------- update

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply a step's results; returns every request that got a new token (finished ones
        included, already removed and freed). Requests gone since `schedule()` are skipped."""
        return self.complete(self.launched(out), result)

    def launched(self, out: SchedulerOutput) -> list[LaunchedRow]:
        """What a launched step changes before its tokens are known: each row's fed tokens
        count as computed, and a sampling row has one token in flight
        (`Request.num_pending_tokens`), which the next `schedule()` may already feed."""
        rows: list[LaunchedRow] = []
        for s in out.scheduled:
            request = self._requests.get(s.request_id)
            if request is None or not self._still_scheduled(request, s):
                continue
            request.num_computed_tokens += s.num_tokens
            if s.sample:
                request.num_pending_tokens += 1
            rows.append((s, request, request.num_preemptions))
        return rows

    def complete(self, rows: list[LaunchedRow], result: RunnerOutput) -> list[Request]:
        """Append a launched step's tokens (stop checks token by token); returns every request
        that got a new token (finished ones included, already removed and freed). A request
        finished or aborted since the launch is skipped: its result is dropped. One preempted
        since keeps its token (the step computed it from KV that was still whole)."""
        updated: list[Request] = []
        for s, request, preemptions in rows:
            if self._requests.get(s.request_id) is not request:
                continue
            running = (
                request.status is RequestStatus.RUNNING and request.num_preemptions == preemptions
            )
            if s.sample:
                request.num_pending_tokens -= 1
                self._append_tokens(request, s, result)
            if running:
                self.kv.cache_blocks(request)
            if request.status.finished:
                self._remove_finished(request)
            if s.sample:
                updated.append(request)
        return updated

    def _append_tokens(self, request: Request, s: ScheduledRequest, result: RunnerOutput) -> None:
        """Append the step's tokens one by one until a stop condition; the KV of every accepted
        draft (all appended tokens but the last) is computed now."""
        tokens = result.new_token_ids(s.request_id)
        if s.num_lookahead and self.config.speculation is not None:
            num_drafts = result.num_draft_tokens.get(s.request_id, 0)
            self.config.speculation.after_verify(request, num_drafts, len(tokens) - 1)
            self.num_draft_tokens_total += num_drafts
            self.num_accepted_tokens_total += len(tokens) - 1
        appended = 0
        for token in tokens:
            request.output_token_ids.append(token)
            appended += 1
            self._check_stop(request, token)
            if request.status.finished:
                break
        request.num_computed_tokens += appended - 1
        request.num_new_tokens = appended
        if s.num_lookahead:
            self.kv.trim(request, request.num_computed_tokens)

    @staticmethod
    def _still_scheduled(request: Request, s: ScheduledRequest) -> bool:
        """False for a request aborted (and maybe re-added under its id) or preempted since."""
        return (
            request.status is RequestStatus.RUNNING
            and request.num_computed_tokens == s.start_position
        )

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            is_eos = not params.ignore_eos and token in request.eos_token_ids
            if is_eos or token in params.stop_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return
        if self._at_length_limit(request):
            request.status = RequestStatus.FINISHED_LENGTH

    def _remove_finished(self, request: Request) -> None:
        del self._requests[request.request_id]
        if self._running.pop(request.request_id, None) is not None:
            self._gone.append(request.request_id)
        if self._waiting.pop(request.request_id, None) is not None:
            # preempted with its last token in flight: a swapped-out copy goes too
            if request.num_swapped_tokens and self.swap is not None:
                self.swap.discard(request.request_id)
                request.num_swapped_tokens = 0
        self._release_blocks(request)

    def _release_blocks(self, request: Request) -> None:
        """A finished request frees its grammar matcher, and its blocks or hands them to a KV
        lease (`hold_kv`)."""
        if request.grammar is not None:
            request.grammar.free()
        if request.hold_kv and request.status is not RequestStatus.FINISHED_ABORTED:
            request.held_block_ids = self.kv.detach(request)
        else:
            self.kv.free(request)
