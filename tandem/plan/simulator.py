"""The cluster against simulated time: arrivals, the router, the pools and the KV links.

Stages of one request, each the production code where the production decides:
  1. the router: one server, `router_s_per_request` of CPU per request in FIFO order (the
     measured capacity of one router process), then placement and admission by
     `router.policy.place` / `place_colocated` over `WorkerEntry.view()`s, booked with
     `router.registry.reserve_on`; a Rejection ends the request as an SLO miss
  2. disaggregated: the prefill worker's real Scheduler prefills it (`max_tokens=1`,
     `hold_kv`, deadline = arrival + TTFT target); the first token is out at that step's end;
     the decode worker takes blocks for the prompt (no room: the request fails, as
     WorkerRejectedError would), the KV crosses the link, then the prefill frees its lease and
     the request joins the decode worker's running batch
  3. colocated: one worker's scheduler prefills (chunked) and decodes it
  4. heartbeats every `heartbeat_interval_s`: every entry's snapshot is refreshed and
     `router.registry.clear_shown` drops the bookings it shows
Not modelled: prefix hits (workload prompts share none), the router queue's EDF order and
dispatch slots (FIFO here), retries, failures, the detokenizer.

Early stop: with `stop_after_misses`, the run ends once that many requests have missed for
certain (rejected, first token late, or TPOT over target at the end): the search only needs to
know attainment fell below target, and an overloaded cluster is the slowest to simulate.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import time
from dataclasses import dataclass

from engine.request import Request
from engine.scheduler.config import SchedulerConfig
from router.policy import (
    Demand,
    Placement,
    PrefillChoice,
    Rejection,
    place,
    place_colocated,
    place_decode,
    place_prefill,
)
from router.registry import Pool, WorkerEntry, WorkerState, clear_shown, reserve_on
from router.slo import Slo
from tandem.plan.cluster import ClusterConfig, EngineLimits, SloTargets
from tandem.plan.profile import CostProfile
from tandem.plan.records import RequestRecord, SimResult
from tandem.plan.router_costs import router_cost_model
from tandem.plan.worker import Role, SimWorker, new_request
from tandem.plan.workload import Arrival

_ARRIVE, _PLACE, _STEP, _LANDED, _BEAT = range(5)


class Phase(str, enum.Enum):
    """What a run simulates. PREFILL: a prefill pool alone (placement by `place_prefill`;
    a request ends at its first token). DECODE: a decode pool alone (placement by
    `place_decode`; a request arrives prefilled, its first token at arrival). BOTH: the whole
    path (a disaggregated or colocated config)."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class SimSettings:
    heartbeat_interval_s: float = 0.5
    max_model_len: int | None = None  # None: the profile's
    enable_prefix_caching: bool = True
    drain_s: float = 120.0  # at most this long after the last arrival (see `run`)


def _scheduler_config(
    limits: EngineLimits, max_model_len: int, block_size: int, caching: bool
) -> SchedulerConfig:
    return SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=limits.max_num_seqs,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        block_size=block_size,
        enable_prefix_caching=caching,
    )


@dataclass(frozen=True)
class _Transfer:
    """A prompt's KV in flight from `prefill` to `decode` (`follow` is the decode side's)."""

    record: RequestRecord
    follow: Request
    prefill: SimWorker
    decode: SimWorker


class ClusterSim:
    """One run of a trace on one configuration. Not reusable: build one per run."""

    def __init__(
        self,
        profile: CostProfile,
        config: ClusterConfig,
        slo: SloTargets,
        settings: SimSettings = SimSettings(),
        phase: Phase = Phase.BOTH,
    ) -> None:
        self.profile, self.config, self.slo, self.settings = profile, config, slo, settings
        self.phase = phase
        assert (phase is Phase.BOTH) == (
            config.colocated or config.num_prefill * config.num_decode > 0
        )
        self.now = 0.0
        self._events: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        self.workers: dict[str, SimWorker] = {}
        self.entries: dict[str, WorkerEntry] = {}
        self._link = profile.link(config.link)
        self._router_free_at = 0.0
        self._misses = 0
        self._by_id: dict[str, RequestRecord] = {}
        self._build()

    # ------------------------------------------------------------------ set-up
    def _build(self) -> None:
        c = self.config
        if c.colocated:
            self._add_pool(
                Role.COLOCATED, Pool.COLOCATED, c.num_colocated, c.colocated_tp, c.colocated_limits
            )
        else:
            self._add_pool(
                Role.PREFILL, Pool.PREFILL, c.num_prefill, c.prefill_tp, c.prefill_limits
            )
            self._add_pool(Role.DECODE, Pool.DECODE, c.num_decode, c.decode_tp, c.decode_limits)

    def _add_pool(self, role: Role, pool: Pool, count: int, tp: int, limits: EngineLimits) -> None:
        costs = self.profile.costs(tp)
        max_len = self.settings.max_model_len or self.profile.max_model_len
        config = _scheduler_config(
            limits, max_len, self.profile.block_size, self.settings.enable_prefix_caching
        )
        cost_model = router_cost_model(costs, self.profile, self.config.link)
        for i in range(count):
            worker_id = f"{role.value}-{i}"
            worker = SimWorker(worker_id, role, costs, config, self._clock)
            self.workers[worker_id] = worker
            entry = WorkerEntry(worker_id, pool, None, None, worker.snapshot(), cost_model)
            entry.state = WorkerState.HEALTHY
            self.entries[worker_id] = entry

    def _clock(self) -> float:
        return self.now

    def _push(self, at: float, kind: int, payload: object) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, payload))

    # --------------------------------------------------------------------- run
    def run(
        self, arrivals: list[Arrival], rate: float, stop_after_misses: int | None = None
    ) -> SimResult:
        start = time.perf_counter()
        records = [
            RequestRecord(i, a.time, a.prompt_len, a.output_len) for i, a in enumerate(arrivals)
        ]
        for r in records:
            self._push(r.arrival, _ARRIVE, r)
        self._push(self.settings.heartbeat_interval_s, _BEAT, None)
        # past arrival + TTFT + TPOT x (output - 1) a request has missed whatever comes next
        longest = max((a.output_len for a in arrivals), default=1)
        drain = min(self.settings.drain_s, self.slo.ttft_s + self.slo.tpot_s * longest + 1.0)
        horizon = (arrivals[-1].time if arrivals else 0.0) + drain
        stopped = False
        handlers = (self._arrive, self._place, self._step_done, self._landed, self._beat)
        while self._events:
            at, _, kind, payload = heapq.heappop(self._events)
            if at > horizon:
                break
            self.now = at
            handlers[kind](payload)
            if stop_after_misses is not None and self._misses > stop_after_misses:
                stopped = True
                break
        steps = sum(w.num_steps for w in self.workers.values())
        rejections: dict[str, int] = {}
        for r in records:
            if r.failed:
                key = r.failed.split(" on ")[0][:60]
                rejections[key] = rejections.get(key, 0) + 1
        return SimResult(
            self.config,
            rate,
            records,
            self.now,
            time.perf_counter() - start,
            steps,
            stopped,
            rejections,
        )

    # ------------------------------------------------------------------ router
    def _arrive(self, record: object) -> None:
        assert isinstance(record, RequestRecord)
        begin = max(self.now, self._router_free_at)
        self._router_free_at = begin + self.profile.router_s_per_request
        self._push(self._router_free_at, _PLACE, record)

    def _views(self, pool: Pool) -> list[WorkerEntry]:
        return [e for e in self.entries.values() if e.pool is pool]

    def _plan(self, demand: Demand) -> Placement | Rejection:
        """The production placement for this run's phase."""
        if self.config.colocated:
            return place_colocated([e.view() for e in self._views(Pool.COLOCATED)], demand, {})
        prefill = [e.view() for e in self._views(Pool.PREFILL)]
        decode = [e.view() for e in self._views(Pool.DECODE)]
        if self.phase is Phase.BOTH:
            return place(prefill, decode, demand, {})
        if self.phase is Phase.PREFILL:
            choice = place_prefill(prefill, demand, {}, transfer=True)
            return choice if isinstance(choice, Rejection) else Placement(choice, None)
        d = place_decode(decode, demand)
        return d if isinstance(d, Rejection) else Placement(PrefillChoice(d.worker_id, 0.0, 0), d)

    def _place(self, record: object) -> None:
        assert isinstance(record, RequestRecord)
        slo = Slo(self.slo.ttft_s, self.slo.tpot_s, best_effort=False, priority=0)
        demand = Demand(record.prompt_len, record.output_len, slo)
        plan = self._plan(demand)
        if isinstance(plan, Rejection):
            self._fail(record, plan.reason)
            return
        record.reservation = reserve_on(self.entries, plan, record.prompt_len, _nothing)
        request_id = f"r{record.index}"
        self._by_id[request_id] = record
        worker = self.workers[plan.prefill.worker_id]
        record.prefill_id = worker.worker_id
        if self.phase is Phase.DECODE:
            self._arrive_prefilled(record, worker)
            return
        if self.phase is Phase.PREFILL:
            deadline = record.arrival + self.slo.ttft_s
            worker.add(
                new_request(
                    request_id, record.index, record.prompt_len, 1, self.now, deadline, hold_kv=True
                )
            )
        elif plan.decode is None:
            worker.add(
                new_request(
                    request_id, record.index, record.prompt_len, record.output_len, self.now
                )
            )
            record.reservation.mark_started()
        else:
            record.decode_id = plan.decode.worker_id
            deadline = record.arrival + self.slo.ttft_s
            worker.add(
                new_request(
                    request_id, record.index, record.prompt_len, 1, self.now, deadline, hold_kv=True
                )
            )
        self._wake(worker)

    def _fail(self, record: RequestRecord, reason: str) -> None:
        record.failed = reason
        self._misses += 1
        if record.reservation is not None:
            record.reservation.release()

    # ----------------------------------------------------------------- workers
    def _wake(self, worker: SimWorker) -> None:
        if worker.busy:
            return
        duration = worker.begin_step()
        if duration is not None:
            self._push(self.now + duration, _STEP, worker)

    def _step_done(self, payload: object) -> None:
        assert isinstance(payload, SimWorker)
        worker = payload
        prefill = worker.role is Role.PREFILL
        for request in worker.end_step():
            # only a first token or a finish changes a record; skip the rest cheaply
            if prefill:
                self._prefilled(self._by_id[request.request_id], request, worker)
            elif request.num_output_tokens == 1 or request.status.finished:
                self._token(self._by_id[request.request_id], request)
        self._wake(worker)

    def _first_token(self, record: RequestRecord) -> None:
        record.first_token = self.now
        assert record.reservation is not None
        record.reservation.end_prefill()
        if self.now - record.arrival > self.slo.ttft_s:
            self._misses += 1

    def _token(self, record: RequestRecord, request: Request) -> None:
        if record.first_token is None:
            self._first_token(record)
        if request.status.finished:
            self._finish(record)

    def _finish(self, record: RequestRecord) -> None:
        record.finish = self.now
        assert record.reservation is not None
        record.reservation.release()
        self._by_id.pop(f"r{record.index}", None)
        tpot = record.tpot
        if (
            tpot is not None
            and tpot > self.slo.tpot_s
            and record.ttft is not None
            and record.ttft <= self.slo.ttft_s
        ):
            self._misses += 1

    def _arrive_prefilled(self, record: RequestRecord, decode: SimWorker) -> None:
        """Decode phase alone: the request comes with its KV and first token, now."""
        self._first_token(record)
        follow = new_request(
            f"r{record.index}", record.index, record.prompt_len, record.output_len, self.now
        )
        if not decode.accept_prefilled(follow):
            self._fail(record, "decode worker had no KV room (WorkerRejectedError)")
            return
        assert record.reservation is not None
        record.reservation.mark_started()
        decode.activate(follow)
        if record.output_len <= 1:
            self._finish(record)
        self._wake(decode)

    def _prefilled(self, record: RequestRecord, request: Request, prefill: SimWorker) -> None:
        self._first_token(record)
        if record.output_len <= 1 or self.phase is Phase.PREFILL:
            prefill.release(request.held_block_ids)
            self._finish(record)
            return
        assert record.decode_id is not None
        decode = self.workers[record.decode_id]
        follow = new_request(
            request.request_id, record.index, record.prompt_len, record.output_len, self.now
        )
        if not decode.accept_prefilled(follow):
            prefill.release(request.held_block_ids)
            self._fail(record, "decode worker had no KV room (WorkerRejectedError)")
            return
        assert record.reservation is not None
        record.reservation.mark_started()
        record.prefill_request = request
        seconds = self._link.transfer_seconds(record.prompt_len * self.profile.kv_bytes_per_token)
        self._push(self.now + seconds, _LANDED, _Transfer(record, follow, prefill, decode))

    def _landed(self, payload: object) -> None:
        assert isinstance(payload, _Transfer)
        record = payload.record
        assert record.prefill_request is not None
        payload.prefill.release(record.prefill_request.held_block_ids)
        record.prefill_request = None
        payload.decode.activate(payload.follow)
        self._wake(payload.decode)

    # --------------------------------------------------------------- heartbeat
    def _beat(self, _: object) -> None:
        for worker_id, entry in self.entries.items():
            entry.beats_begun += 1
            entry.load = self.workers[worker_id].snapshot()
            clear_shown(entry, entry.beats_begun)
        if self._events:  # keep beating while anything else is pending
            self._push(self.now + self.settings.heartbeat_interval_s, _BEAT, None)


def _nothing() -> None:
    """Room freed: the simulated router parks nothing (no best-effort requests)."""


def simulate(
    profile: CostProfile,
    config: ClusterConfig,
    slo: SloTargets,
    arrivals: list[Arrival],
    rate: float,
    settings: SimSettings = SimSettings(),
    stop_after_misses: int | None = None,
    phase: Phase = Phase.BOTH,
) -> SimResult:
    """Run `arrivals` on `config` (module docstring)."""
    return ClusterSim(profile, config, slo, settings, phase).run(arrivals, rate, stop_after_misses)
