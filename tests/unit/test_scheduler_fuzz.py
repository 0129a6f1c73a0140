"""Fuzz: 1,000 random operations (add, step, abort) against a small pool.

With speculation on, decode rows get lookahead slots; the fake runner proposes random drafts
into them (writing their KV like a verify pass) and accepts a random prefix, so acceptances,
rejections and stops inside an accepted run all occur, and the checks below hold throughout.

Hypothesis draws the engine shape and a seed; the seed drives the operation stream (a
1,000-operation list drawn element by element would overrun Hypothesis' buffer). A fake runner
keeps a token-level copy of the KV cache and checks on every step that each request's
context (its own earlier chunks and any prefix-cache hit) holds exactly its tokens, and that
no step writes into a block another request shares.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kv.kv_manager import KVManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.output import RunnerOutput, SchedulerOutput
from engine.scheduler.scheduler import Scheduler, SchedulerConfig
from engine.spec.lookahead import LookaheadPolicy
from engine.utils.math import cdiv

EOS = 0
VOCAB = 6  # tiny, so prompts share prefixes and random EOS / stop tokens are common
NUM_OPS = 1000


class CheckingRunner:
    """Returns random tokens; simulates the KV cache at token granularity and checks it."""

    def __init__(self, sched: Scheduler, rng: random.Random) -> None:
        self.sched = sched
        self.rng = rng
        self.bs = sched.config.block_size
        self.kv: dict[int, list[int | None]] = {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        pool = self.sched.kv.pool
        for s in out.scheduled:
            tokens = s.prompt_token_ids + s.output_token_ids
            assert s.token_ids == tokens[s.start_position : s.seq_len]
            assert s.sample == (s.seq_len == len(tokens))
            end = s.seq_len + s.num_lookahead
            assert len(s.block_ids) == cdiv(end, self.bs)
            assert not s.num_lookahead or (s.num_tokens == 1 and s.sample)
            for p in range(s.start_position):
                assert self._slot(s.block_ids, p) == tokens[p], "context KV holds wrong tokens"
            for block_id in {s.block_ids[p // self.bs] for p in range(s.start_position, end)}:
                assert pool.ref_count(block_id) == 1 and pool.block_hash(block_id) is None
        result = RunnerOutput({})
        for s in out.scheduled:
            drafts = [
                self.rng.randrange(VOCAB) for _ in range(self.rng.randint(0, s.num_lookahead))
            ]
            for j, token in enumerate(s.token_ids + drafts):  # a verify pass writes drafts' KV too
                p = s.start_position + j
                self.kv.setdefault(s.block_ids[p // self.bs], [None] * self.bs)[p % self.bs] = token
            if s.sample:
                result.sampled_token_ids[s.request_id] = self.rng.randrange(VOCAB)
            if s.num_lookahead:
                result.num_draft_tokens[s.request_id] = len(drafts)
                result.accepted_draft_ids[s.request_id] = drafts[: self.rng.randint(0, len(drafts))]
        return result

    def _slot(self, block_ids: list[int], p: int) -> int | None:
        return self.kv.get(block_ids[p // self.bs], [None] * self.bs)[p % self.bs]


def check_scheduler(
    sched: Scheduler, live: dict[str, Request], out: SchedulerOutput, pending: bool
) -> None:
    """Invariants between steps; with `pending`, between schedule() and update()."""
    pool = sched.kv.pool
    num_pending = (
        {s.request_id: s.num_tokens + s.num_lookahead for s in out.scheduled} if pending else {}
    )
    pool.check_integrity()
    cfg = sched.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.scheduled) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert len({s.request_id for s in out.scheduled}) == len(out.scheduled)
    if pending:  # progress: with work queued, every step schedules something
        assert out.scheduled or not live, "a step scheduled nothing"
    refs = 0
    for r in live.values():
        if r.status is RequestStatus.RUNNING:
            num_kv = r.num_computed_tokens + num_pending.get(r.request_id, 0)
            assert len(r.block_ids) == cdiv(num_kv, cfg.block_size)
            assert r.num_computed_tokens < r.num_tokens
        else:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.block_ids == [] and r.num_computed_tokens == 0
        assert r.num_tokens <= cfg.max_model_len
        refs += len(r.block_ids)
    assert refs == sum(pool.ref_count(b) for b in range(1, pool.num_blocks))
    assert sched.num_running + sched.num_waiting == len(live)


def random_prompt(
    rng: random.Random, prefixes: list[list[int]], max_len: int, block_size: int
) -> list[int]:
    """Half the prompts start with one of a few shared prefixes (prefix-cache hits); some
    are a whole shared prefix of full blocks (a hit must still leave the last token)."""
    n = rng.randint(1, max_len)
    if rng.random() < 0.15:
        return rng.choice(prefixes)[: block_size * rng.randint(1, max_len // block_size)]
    head = rng.choice(prefixes)[: rng.randint(0, n)] if rng.random() < 0.5 else []
    return head + [rng.randrange(VOCAB) for _ in range(n - len(head))]


def random_request(
    rng: random.Random, i: int, now: float, cfg: SchedulerConfig, prefixes: list[list[int]]
) -> Request:
    max_tokens = rng.choice([None, rng.randint(1, 12)])
    params = SamplingParams(
        max_tokens=max_tokens,
        min_tokens=rng.randint(0, max_tokens or 3),
        ignore_eos=rng.random() < 0.2,
        stop_token_ids=(1,) if rng.random() < 0.3 else (),
    )
    return Request(
        f"r{i}",
        random_prompt(rng, prefixes, cfg.max_model_len, cfg.block_size),
        params,
        eos_token_ids=(EOS,),
        priority=rng.randint(0, 3),
        deadline=rng.choice([None, now + rng.uniform(0, 50)]),
        arrival_time=now,
    )


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def run_ops(
    seed: int,
    num_blocks: int,
    block_size: int,
    budget: int,
    max_num_seqs: int,
    chunked: bool,
    caching: bool,
    drain_by_abort: bool,
    speculate: bool = False,
) -> Scheduler:
    rng = random.Random(seed)
    max_model_len = min((num_blocks - 1) * block_size, 96)
    cfg = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
        block_size=block_size,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=caching,
        watermark=0.05,
        starvation_timeout_s=40.0,
        speculation=LookaheadPolicy(rng.randint(1, 5), rng.choice([None, 2, 4]))
        if speculate
        else None,
    )
    evicted: list[int] = []
    kv = KVManager(
        num_blocks,
        block_size,
        "fuzz",
        enable_caching=caching,
        on_evict=lambda b, h: evicted.append(b),
    )
    clock = Clock()
    sched = Scheduler(cfg, kv, clock=clock)
    runner = CheckingRunner(sched, rng)
    live: dict[str, Request] = {}
    prefixes = [[rng.randrange(VOCAB) for _ in range(max_model_len)] for _ in range(3)]
    for i in range(NUM_OPS):
        op = rng.random()
        if op < 0.25:
            r = random_request(rng, i, clock.t, cfg, prefixes)
            sched.add_request(r)
            live[r.request_id] = r
        elif op < 0.9:
            clock.t += 1.0
            out = sched.schedule()
            check_scheduler(sched, live, out, pending=True)
            for r in sched.update(out, runner.execute(out)):
                if r.status.finished:
                    assert r.block_ids == [] and live.pop(r.request_id) is r
            check_scheduler(sched, live, out, pending=False)
        elif live:
            ids = rng.sample(sorted(live), k=rng.randint(1, min(3, len(live))))
            for r in sched.abort(ids + ["no-such-id"]):
                assert r.status is RequestStatus.FINISHED_ABORTED and r.block_ids == []
                del live[r.request_id]
            kv.pool.check_integrity()
    drain(sched, runner, live, drain_by_abort)
    assert kv.num_free_blocks == kv.num_usable_blocks
    kv.pool.check_integrity()
    return sched


def drain(
    sched: Scheduler, runner: CheckingRunner, live: dict[str, Request], by_abort: bool
) -> None:
    if by_abort:
        sched.abort(list(live))
    for _ in range(100_000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        sched.update(out, runner.execute(out))
        sched.kv.pool.check_integrity()
    assert not sched.has_unfinished() and sched.num_running == sched.num_waiting == 0
    assert all(r.status.finished and r.block_ids == [] for r in live.values())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(4, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 8),
    chunked=st.booleans(),
    caching=st.booleans(),
    drain_by_abort=st.booleans(),
    speculate=st.booleans(),
)
def test_random_operations_keep_pool_consistent(
    seed: int,
    num_blocks: int,
    block_size: int,
    budget: int,
    max_num_seqs: int,
    chunked: bool,
    caching: bool,
    drain_by_abort: bool,
    speculate: bool,
) -> None:
    run_ops(
        seed,
        num_blocks,
        block_size,
        budget,
        max_num_seqs,
        chunked,
        caching,
        drain_by_abort,
        speculate,
    )


def test_tight_pool_with_prefix_sharing_preempts_and_recovers() -> None:
    """A fixed, adversarial shape: a tiny pool, many sequences, caching on."""
    for seed in range(3):
        run_ops(
            seed,
            num_blocks=8,
            block_size=4,
            budget=32,
            max_num_seqs=8,
            chunked=True,
            caching=True,
            drain_by_abort=False,
        )


def test_speculation_in_a_tight_pool_accepts_rejects_and_frees_everything() -> None:
    """Drafts on every decode row of a small pool with prefix sharing: lookahead never
    preempts, rejected slots are released, every block is free at the end."""
    for seed in range(4):
        sched = run_ops(
            seed,
            num_blocks=10,
            block_size=4,
            budget=24,
            max_num_seqs=6,
            chunked=True,
            caching=True,
            drain_by_abort=seed % 2 == 1,
            speculate=True,
        )
        assert 0 < sched.num_accepted_tokens_total < sched.num_draft_tokens_total
