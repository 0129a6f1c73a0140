"""One simulated worker: the engine's real `Scheduler` over a real `KVManager`, timed by a model.

Each step is the engine's three calls with the runner replaced by a cost model:

    out = scheduler.schedule()          # production code: batching, chunking, preemption
    duration = costs.step_seconds(...)  # the profile, from this SchedulerOutput's shape
    scheduler.update(out, result)       # production code; `result` samples SAMPLED_TOKEN

`begin_step` runs the first two at the step's start and `end_step` the third once the
simulated clock reaches its end (the clock is the simulator's; the scheduler reads it for its
policy). The sampled token is never an EOS (requests carry no EOS ids), so `max_tokens` decides
every length, as with `ignore_eos` in a benchmark.

Hazard: a prompt's token ids must differ between requests, or the real prefix cache finds hits
the workload does not have; `prompt_ids` makes each request's first token its own number.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from engine.kv.kv_manager import KVManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler.config import SchedulerConfig
from engine.scheduler.output import RunnerOutput, SchedulerOutput
from engine.scheduler.scheduler import Scheduler
from tandem.contract.worker_api import LoadSnapshot
from tandem.plan.profile import StepCosts

SAMPLED_TOKEN = 7


class Role(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


def prompt_ids(index: int, length: int) -> list[int]:
    """A prompt no other request shares a block with (index first), so no prefix hits."""
    return [index + 1] + [0] * (length - 1)


def new_request(
    request_id: str,
    index: int,
    prompt_len: int,
    max_tokens: int,
    now: float,
    deadline: float | None = None,
    hold_kv: bool = False,
) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_ids(index, prompt_len),
        sampling_params=params,
        deadline=deadline,
        arrival_time=now,
        hold_kv=hold_kv,
    )


def step_shape(out: SchedulerOutput) -> tuple[int, float, int, int]:
    """(new prefill tokens, their attention pairs, decode batch, decode context) of a step."""
    new, pairs, batch, context = 0, 0.0, 0, 0
    for s in out.scheduled:
        if s.start_position >= len(s.prompt_token_ids):  # a decode row (one generated token)
            batch += 1
            context += s.seq_len
        else:
            n = s.num_tokens
            new += n
            pairs += n * (s.start_position + n / 2)
    return new, pairs, batch, context


class SimWorker:
    """A worker of one role; `busy` while a step is in flight (between begin and end)."""

    def __init__(
        self,
        worker_id: str,
        role: Role,
        costs: StepCosts,
        config: SchedulerConfig,
        clock: Callable[[], float],
    ) -> None:
        num_blocks = costs.kv_capacity_tokens // config.block_size
        self.worker_id = worker_id
        self.role = role
        self.costs = costs
        self.kv = KVManager(num_blocks, config.block_size, "plan", config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv, clock)
        self.busy = False
        self.num_steps = 0
        self.busy_s = 0.0
        self._out: SchedulerOutput | None = None

    # -------------------------------------------------------------- requests
    def add(self, request: Request) -> None:
        """A prompt to prefill (and decode, colocated)."""
        self.scheduler.add_request(request)

    def accept_prefilled(self, request: Request) -> bool:
        """Blocks for a prompt whose KV will arrive (engine.add_prefilled); False: no room."""
        if not self.kv.can_allocate_slots(request, request.num_prompt_tokens):
            return False
        self.kv.allocate_slots(request, request.num_prompt_tokens)
        return True

    def activate(self, request: Request) -> None:
        """The KV landed and the first token is known: join the running batch
        (engine.activate_prefilled)."""
        request.output_token_ids.append(SAMPLED_TOKEN)
        request.num_computed_tokens = request.num_prompt_tokens
        if request.num_output_tokens >= (request.sampling_params.max_tokens or 0):
            self.kv.free(request)  # ends at its first token: nothing to decode
            return
        self.scheduler.add_running(request)

    def release(self, block_ids: list[int]) -> None:
        """Free a finished prefill's held KV (the sender's lease, on the decode side's ack)."""
        self.kv.release(block_ids)

    # ----------------------------------------------------------------- steps
    def begin_step(self) -> float | None:
        """Schedule a step; its duration, or None when there is nothing to run (idle)."""
        assert not self.busy
        out = self.scheduler.schedule()
        if out.is_empty:
            return None
        new, pairs, batch, context = step_shape(out)
        duration = self.costs.step_seconds(new, pairs, batch, context)
        self._out, self.busy = out, True
        self.num_steps += 1
        self.busy_s += duration
        return duration

    def end_step(self) -> list[Request]:
        """Apply the step in flight; the requests that got a token (finished ones included)."""
        out, self._out, self.busy = self._out, None, False
        assert out is not None
        sampled = {s.request_id: SAMPLED_TOKEN for s in out.scheduled if s.sample}
        return self.scheduler.update(out, RunnerOutput(sampled))

    def snapshot(self) -> LoadSnapshot:
        """The heartbeat payload, as `engine.worker_stats.engine_load` computes it."""
        waiting = self.scheduler.waiting_requests()
        queued = sum(r.num_tokens - r.num_computed_tokens for r in waiting)
        return LoadSnapshot(
            num_queued_prefill_tokens=queued,
            num_running=self.scheduler.num_running,
            num_waiting=len(waiting),
            num_free_blocks=self.kv.num_free_blocks,
            num_total_blocks=self.kv.num_usable_blocks,
            block_size=self.kv.block_size,
        )
