"""Fuzz the scheduler under overlap scheduling: random adds, steps and aborts while the
previous step is still in flight (its tokens not yet on the host).

The loop is the engine's: schedule step N+1, launch it, `launched()`, then `complete()` step N.
A fake runner picks each step's tokens at launch and fills a row's pending input from the
previous launch, as the real runner does from device memory; it keeps a token-level copy of
the KV cache and checks that every context holds exactly the request's tokens once they are
known, and that no step writes into a block another request shares or the prefix cache holds.
At the end every block is free and the pool is consistent.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kv.kv_manager import KVManager
from engine.request import Request, RequestStatus
from engine.scheduler.output import RunnerOutput, SchedulerOutput
from engine.scheduler.scheduler import LaunchedRow, Scheduler, SchedulerConfig
from engine.utils.math import cdiv
from tests.unit.test_scheduler_fuzz import VOCAB, Clock, random_request

NUM_OPS = 600


class OverlapRunner:
    """Tokens chosen at launch; pending inputs filled from the previous launch's tokens."""

    def __init__(self, sched: Scheduler, rng: random.Random) -> None:
        self.sched = sched
        self.rng = rng
        self.bs = sched.config.block_size
        self.kv: dict[int, list[int | None]] = {}
        self.last: dict[str, int] = {}
        self.num_pending_inputs = 0

    def launch(self, out: SchedulerOutput) -> RunnerOutput:
        pool = self.sched.kv.pool
        result = RunnerOutput({})
        for s in out.scheduled:
            known = s.prompt_token_ids + s.output_token_ids
            fed = list(s.token_ids)
            if s.input_pending:
                self.num_pending_inputs += 1
                assert fed[-1] == 0 and s.seq_len == len(known) + 1
                fed[-1] = self.last[s.request_id]
            else:
                assert s.seq_len <= len(known)
            assert (
                fed[: len(fed) - s.input_pending]
                == known[s.start_position : s.seq_len][: len(fed) - s.input_pending]
            )
            assert len(s.block_ids) == cdiv(s.seq_len, self.bs)
            for p in range(s.start_position):
                assert self._slot(s.block_ids, p) == known[p], "context KV holds wrong tokens"
            for p in range(s.start_position, s.seq_len):
                block_id = s.block_ids[p // self.bs]
                assert pool.ref_count(block_id) == 1 and pool.block_hash(block_id) is None
                self.kv.setdefault(block_id, [None] * self.bs)[p % self.bs] = fed[
                    p - s.start_position
                ]
            if s.sample:
                result.sampled_token_ids[s.request_id] = self.rng.randrange(VOCAB)
        self.last = dict(result.sampled_token_ids)
        return result

    def _slot(self, block_ids: list[int], p: int) -> int | None:
        return self.kv.get(block_ids[p // self.bs], [None] * self.bs)[p % self.bs]


def run_overlapped(seed: int, num_blocks: int, block_size: int, budget: int, seqs: int) -> int:
    rng = random.Random(seed)
    max_model_len = min((num_blocks - 1) * block_size, 96)
    cfg = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=budget,
        block_size=block_size,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        watermark=0.05,
    )
    kv = KVManager(num_blocks, block_size, "fuzz-overlap", enable_caching=True)
    clock = Clock()
    sched = Scheduler(cfg, kv, clock=clock)
    runner = OverlapRunner(sched, rng)
    live: dict[str, Request] = {}
    prefixes = [[rng.randrange(VOCAB) for _ in range(max_model_len)] for _ in range(3)]
    inflight: tuple[list[LaunchedRow], RunnerOutput] | None = None

    def step() -> None:
        nonlocal inflight
        clock.t += 1.0
        out = sched.schedule()
        result = runner.launch(out)
        rows = sched.launched(out)
        previous, inflight = inflight, (rows, result)
        if previous is not None:
            for r in sched.complete(*previous):
                if r.status.finished:
                    assert r.block_ids == [] and live.pop(r.request_id) is r
        kv.pool.check_integrity()
        for r in live.values():
            assert r.num_pending_tokens in (0, 1, 2)
            assert r.num_tokens + r.num_pending_tokens <= cfg.max_model_len + 1  # + the last

    for i in range(NUM_OPS):
        op = rng.random()
        if op < 0.25:
            r = random_request(rng, i, clock.t, cfg, prefixes)
            sched.add_request(r)
            live[r.request_id] = r
        elif op < 0.9:
            step()
        elif live:
            ids = rng.sample(sorted(live), k=rng.randint(1, min(3, len(live))))
            for r in sched.abort(ids):
                assert r.status is RequestStatus.FINISHED_ABORTED and r.block_ids == []
                del live[r.request_id]
            kv.pool.check_integrity()
    for _ in range(100_000):
        if not sched.has_unfinished() and inflight is not None and not inflight[0]:
            break
        step()
    assert not live and sched.num_running == sched.num_waiting == 0
    assert kv.num_free_blocks == kv.num_usable_blocks
    kv.pool.check_integrity()
    return runner.num_pending_inputs


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(4, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 64),
    seqs=st.integers(1, 8),
)
def test_overlapped_steps_keep_pool_and_kv_consistent(
    seed: int, num_blocks: int, block_size: int, budget: int, seqs: int
) -> None:
    run_overlapped(seed, num_blocks, block_size, budget, seqs)


def test_pending_inputs_happen() -> None:
    """The fuzz exercises the path at all: decode rows fed from the step in flight."""
    assert run_overlapped(1, 40, 4, 32, 8) > 50


class RecordingSwap:
    """A PreemptionSwap that keeps no bytes: it records what the scheduler asks of it."""

    def __init__(self) -> None:
        self.out: list[str] = []
        self.discarded: list[str] = []

    def swap_out(self, request_id: str, block_ids: list[int]) -> bool:
        self.out.append(request_id)
        return True

    def swap_in(self, request_id: str, block_ids: list[int]) -> None:
        raise AssertionError("nothing is re-admitted here")

    def discard(self, request_id: str) -> None:
        self.discarded.append(request_id)


def test_swapped_request_whose_last_token_was_in_flight_drops_its_copy() -> None:
    """B is preempted (swapped out) while its token is in flight; that token is EOS: B ends
    from the waiting queue and its swapped copy is discarded, not leaked."""
    from engine.sampling_params import SamplingParams

    cfg = SchedulerConfig(
        max_model_len=8, max_num_seqs=2, max_num_batched_tokens=16, block_size=2
    )  # fmt: skip
    kv = KVManager(5, 2, "swap-in-flight", enable_caching=False)  # 4 usable blocks
    sched = Scheduler(cfg, kv)
    swap = RecordingSwap()
    sched.attach_swap(swap)
    params = SamplingParams(max_tokens=6)
    a = Request("a", [1, 2, 3], params, eos_token_ids=(0,), priority=0)
    b = Request("b", [1, 2, 4], params, eos_token_ids=(0,), priority=1)
    sched.add_request(a)
    sched.add_request(b)
    step1 = sched.launched(sched.schedule())  # both prompts; a token each in flight
    sched.complete(step1, RunnerOutput({"a": 5, "b": 6}))
    step2 = sched.launched(sched.schedule())  # both decode; in flight
    step3 = sched.launched(sched.schedule())  # a needs a third block: b (lower priority) goes
    assert swap.out == ["b"] and b.status is RequestStatus.PREEMPTED and b.num_pending_tokens == 1
    sched.complete(step2, RunnerOutput({"a": 7, "b": 0}))  # b's token in flight was EOS
    assert b.status is RequestStatus.FINISHED_STOPPED and swap.discarded == ["b"]
    assert sched.num_waiting == 0 and b.output_token_ids == [6, 0]
    sched.complete(step3, RunnerOutput({"a": 1}))
    sched.abort(["a"])
    assert kv.num_free_blocks == kv.num_usable_blocks
    kv.pool.check_integrity()
