"""Scheduler: chunked prefill, decode batching, limits, preemption, ordering, abort, stops.

Driven by a tiny fake runner that returns random (or scripted) tokens: no model needed.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from engine.errors import EngineConfigError, InvalidRequestError
from engine.kv.kv_manager import KVManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.output import RunnerOutput, SchedulerOutput
from engine.scheduler.scheduler import Scheduler, SchedulerConfig

EOS = 2


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeRunner:
    """Random tokens in [10, 100) (never EOS), or scripted ones per request id."""

    def __init__(self, seed: int = 0, script: dict[str, list[int]] | None = None) -> None:
        self.rng = random.Random(seed)
        self.script = script or {}

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        tokens = {}
        for s in out.scheduled:
            if s.sample:
                queue = self.script.get(s.request_id)
                tokens[s.request_id] = queue.pop(0) if queue else self.rng.randrange(10, 100)
        return RunnerOutput(sampled_token_ids=tokens)


def make(
    num_blocks: int = 64, *, salt: str = "m", clock: Clock | None = None, **overrides: object
) -> Scheduler:
    config = SchedulerConfig(**{"max_model_len": 256, **overrides})  # type: ignore[arg-type]
    kv = KVManager(num_blocks, config.block_size, salt, enable_caching=config.enable_prefix_caching)
    return Scheduler(config, kv, clock=clock or Clock())


def req(
    request_id: str,
    num_prompt: int,
    *,
    first: int = 1000,
    arrival: float = 0.0,
    priority: int = 0,
    deadline: float | None = None,
    **params: object,
) -> Request:
    return Request(
        request_id,
        list(range(first, first + num_prompt)),
        SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_ids=(EOS,),
        priority=priority,
        deadline=deadline,
        arrival_time=arrival,
    )


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    out = sched.schedule()
    updated = sched.update(out, runner.execute(out))
    sched.kv.pool.check_integrity()
    return out, updated


def drain(sched: Scheduler, runner: FakeRunner, max_steps: int = 10_000) -> None:
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return
        step(sched, runner)
    raise AssertionError("requests did not finish")


def assert_all_free(sched: Scheduler) -> None:
    assert sched.kv.num_free_blocks == sched.kv.num_usable_blocks
    sched.kv.pool.check_integrity()


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", -1),
        ("max_model_len", 0),
        ("block_size", 0),
        ("watermark", 1.0),
        ("starvation_timeout_s", 0.0),
        ("enable_chunked_prefill", 1),
    ],
)
def test_config_rejects_bad_field(field: str, value: object) -> None:
    with pytest.raises(EngineConfigError, match=field):
        SchedulerConfig(**{"max_model_len": 256, field: value})  # type: ignore[arg-type]


def test_config_without_chunking_needs_budget_for_whole_prompt() -> None:
    with pytest.raises(EngineConfigError, match="max_num_batched_tokens"):
        SchedulerConfig(max_model_len=256, max_num_batched_tokens=128, enable_chunked_prefill=False)


def test_scheduler_rejects_model_len_beyond_pool_and_block_size_mismatch() -> None:
    with pytest.raises(EngineConfigError, match="max_model_len"):
        make(num_blocks=8, max_model_len=8 * 16)  # 7 usable blocks hold 112 tokens
    with pytest.raises(EngineConfigError, match="block_size"):
        Scheduler(SchedulerConfig(max_model_len=64), KVManager(16, 8, "m"))


def test_add_request_rejects_duplicate_and_oversized() -> None:
    sched = make(max_model_len=64)
    sched.add_request(req("a", 10))
    with pytest.raises(InvalidRequestError, match="request_id"):
        sched.add_request(req("a", 10))
    with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
        sched.add_request(req("b", 65))


# --------------------------------------------------------- batching shapes


def test_chunked_prefill_splits_prompt_and_samples_on_last_chunk() -> None:
    sched = make(max_num_batched_tokens=16)
    r = req("a", 50, max_tokens=4)
    sched.add_request(r)
    runner = FakeRunner()
    chunks = []
    for _ in range(4):
        out, updated = step(sched, runner)
        (s,) = out.scheduled
        chunks.append((s.num_tokens, s.start_position, s.sample))
        assert s.token_ids == r.prompt_token_ids[s.start_position : s.seq_len]
        assert len(s.block_ids) * 16 >= s.seq_len
        assert out.num_batched_tokens == s.num_tokens
        assert updated == ([r] if s.sample else [])
    assert chunks == [(16, 0, False), (16, 16, False), (16, 32, False), (2, 48, True)]
    assert r.num_output_tokens == 1 and r.num_computed_tokens == 50


def test_without_chunking_prompt_is_scheduled_whole() -> None:
    sched = make(max_num_batched_tokens=256, enable_chunked_prefill=False)
    a, b = req("a", 200, first=0), req("b", 100, first=5000)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, FakeRunner())
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 200)]
    out, _ = step(sched, FakeRunner())  # a decodes (1) and b's whole prompt fits (100)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 100)]


def test_decode_batches_one_token_per_request() -> None:
    sched = make()
    rs = [req(f"r{i}", 5 + i, first=100 * i, max_tokens=8) for i in range(3)]
    for r in rs:
        sched.add_request(r)
    runner = FakeRunner()
    out, updated = step(sched, runner)
    assert [s.num_tokens for s in out.scheduled] == [5, 6, 7]
    assert updated == rs
    out, updated = step(sched, runner)
    assert out.decode_only and out.num_batched_tokens == 3
    for s, r in zip(out.scheduled, rs):
        assert s.token_ids == [r.output_token_ids[0]]
        assert s.start_position == r.num_prompt_tokens
    assert all(r.num_output_tokens == 2 for r in rs)


def test_max_num_seqs_is_respected() -> None:
    sched = make(max_num_seqs=2)
    rs = [req(f"r{i}", 4, first=10 * i, max_tokens=3) for i in range(5)]
    for r in rs:
        sched.add_request(r)
    runner = FakeRunner()
    while sched.has_unfinished():
        out, _ = step(sched, runner)
        assert len(out.scheduled) <= 2 and sched.num_running <= 2
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 3 for r in rs)
    assert_all_free(sched)


def test_prefix_hit_skips_cached_tokens() -> None:
    sched = make()
    runner = FakeRunner()
    sched.add_request(req("a", 40, max_tokens=2))
    drain(sched, runner)
    b = req("b", 40, max_tokens=2)  # the same prompt: 2 full blocks hit, the rest computed
    sched.add_request(b)
    out, _ = step(sched, runner)
    (s,) = out.scheduled
    assert (s.start_position, s.num_tokens) == (32, 8)
    assert b.num_cached_tokens == 32
    stats = sched.stats()
    assert stats.prefix_hit_tokens == 32 and stats.prefix_queried_tokens == 80


# --------------------------------------------------------------- preemption


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    # 6 usable blocks of 4 tokens. Each request grows from 8 to 19 tokens (5 blocks): both
    # cannot stay resident, so the later one in policy order (b, priority 1) is preempted.
    sched = make(num_blocks=7, block_size=4, max_model_len=24)
    a = req("a", 8, first=0, priority=0, max_tokens=12)
    b = req("b", 8, first=500, priority=1, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    runner = FakeRunner(seed=3)
    preempted_at = None
    for i in range(100):
        out, _ = step(sched, runner)
        if out.preempted_ids:
            assert out.preempted_ids == ["b"] and "b" not in [s.request_id for s in out.scheduled]
            assert b.status is RequestStatus.PREEMPTED and b.block_ids == []
            assert b.num_computed_tokens == 0 and b.num_preemptions == 1
            assert sched.stats().num_preemptions_total == 1
            outputs_before = list(b.output_token_ids)
            preempted_at = i
            break
    # prefill (step 0), then each request's 3rd block holds positions 8..11 (steps 1-4): at step
    # 5 both need a 4th block, and 2 x 4 blocks exceed the 6 usable ones
    assert preempted_at == 5
    readmitted = False
    while sched.has_unfinished():
        out, _ = step(sched, runner)
        for s in out.scheduled:
            if s.request_id == "b" and s.start_position + s.num_tokens > 8 and not readmitted:
                readmitted = True  # recompute: prompt + earlier outputs are fed as the prompt
                assert (
                    s.token_ids
                    == (b.prompt_token_ids + outputs_before)[s.start_position : s.seq_len]
                )
    assert readmitted
    for r in (a, b):
        assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 12
        assert r.block_ids == []
    assert b.output_token_ids[: len(outputs_before)] == outputs_before
    assert_all_free(sched)


def test_lone_request_that_cannot_grow_is_an_internal_error() -> None:
    sched = make(num_blocks=9, block_size=4, max_model_len=32)
    sched.add_request(req("a", 8, max_tokens=20))
    step(sched, FakeRunner())  # 8 tokens in 2 full blocks; the next token needs a 3rd
    sched.kv.pool.allocate(sched.kv.num_free_blocks)  # a leak elsewhere takes the rest
    with pytest.raises(RuntimeError, match="alone needs more KV blocks"):
        sched.schedule()


# ------------------------------------------------------------------ ordering


def test_priority_then_deadline_then_arrival_order_admission() -> None:
    clock = Clock(10.0)
    sched = make(max_num_seqs=1, clock=clock)
    specs = [
        ("late-low", dict(arrival=0.0, priority=5)),
        ("no-deadline", dict(arrival=1.0, priority=0)),
        ("deadline-20", dict(arrival=2.0, priority=0, deadline=20.0)),
        ("deadline-15", dict(arrival=3.0, priority=0, deadline=15.0)),
        ("no-deadline-2", dict(arrival=4.0, priority=0)),
    ]
    for i, (name, kw) in enumerate(specs):
        sched.add_request(req(name, 3, first=100 * i, max_tokens=1, **kw))  # type: ignore[arg-type]
    order = []
    while sched.has_unfinished():
        out, _ = step(sched, FakeRunner())
        order += [s.request_id for s in out.scheduled]
    assert order == ["deadline-15", "deadline-20", "no-deadline", "no-deadline-2", "late-low"]


def test_starvation_guard_admits_old_request_first() -> None:
    clock = Clock(0.0)
    sched = make(max_num_seqs=1, clock=clock, starvation_timeout_s=30.0)
    sched.add_request(req("old-low", 3, first=0, arrival=0.0, priority=9, max_tokens=1))
    sched.add_request(req("new-high", 3, first=50, arrival=25.0, priority=0, max_tokens=1))
    clock.t = 29.0  # not starved yet: priority wins
    out, _ = step(sched, FakeRunner())
    assert [s.request_id for s in out.scheduled] == ["new-high"]
    sched.add_request(req("newer-high", 3, first=90, arrival=29.0, priority=0, max_tokens=1))
    clock.t = 31.0  # old-low has waited 31 s > 30 s
    out, _ = step(sched, FakeRunner())
    assert [s.request_id for s in out.scheduled] == ["old-low"]


# -------------------------------------------------------------------- abort


def test_abort_frees_blocks_at_once() -> None:
    sched = make()
    a, b = req("a", 40, first=0), req("b", 30, first=100)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, FakeRunner())
    held = sched.kv.num_usable_blocks - sched.kv.num_free_blocks
    assert held == 3 + 2
    aborted = sched.abort(["a", "unknown"])
    assert aborted == [a] and a.status is RequestStatus.FINISHED_ABORTED
    assert a.block_ids == [] and sched.get_request("a") is None
    assert sched.kv.num_usable_blocks - sched.kv.num_free_blocks == 2
    assert sched.abort(["a"]) == []  # already gone
    sched.abort(["b"])
    assert not sched.has_unfinished()
    assert_all_free(sched)


def test_abort_between_schedule_and_update_is_skipped() -> None:
    sched = make()
    a, b = req("a", 20, first=0, max_tokens=5), req("b", 20, first=100, max_tokens=5)
    sched.add_request(a)
    sched.add_request(b)
    runner = FakeRunner()
    out = sched.schedule()
    result = runner.execute(out)
    sched.abort(["a"])
    assert_all_free_but(sched, b)
    updated = sched.update(out, result)
    assert updated == [b] and a.output_token_ids == []
    # The same id re-added before update() must not take the old step's result.
    out = sched.schedule()
    result = runner.execute(out)
    sched.abort(["b"])
    b2 = req("b", 20, first=100, max_tokens=5)
    sched.add_request(b2)
    assert sched.update(out, result) == []
    assert b2.num_computed_tokens == 0 and b2.status is RequestStatus.WAITING
    drain(sched, runner)
    assert_all_free(sched)


def assert_all_free_but(sched: Scheduler, request: Request) -> None:
    assert sched.kv.num_usable_blocks - sched.kv.num_free_blocks == len(request.block_ids)
    sched.kv.pool.check_integrity()


def test_finish_from_engine_frees_blocks() -> None:
    sched = make()
    a = req("a", 20)
    sched.add_request(a)
    step(sched, FakeRunner())
    assert sched.finish("a", RequestStatus.FINISHED_STOPPED, stop_reason="\n\n") is a
    assert a.status is RequestStatus.FINISHED_STOPPED and a.stop_reason == "\n\n"
    assert sched.finish("a", RequestStatus.FINISHED_STOPPED) is None
    assert_all_free(sched)


# ------------------------------------------------------------ finish reasons


def run_one(r: Request, script: list[int], max_model_len: int = 256) -> Scheduler:
    sched = make(max_model_len=max_model_len)
    sched.add_request(r)
    drain(sched, FakeRunner(script={r.request_id: script}))
    assert_all_free(sched)
    return sched


def test_eos_stops() -> None:
    r = req("a", 5, max_tokens=10)
    run_one(r, [11, 12, EOS, 13])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == EOS
    assert r.output_token_ids == [11, 12, EOS]


def test_stop_token_id_stops() -> None:
    r = req("a", 5, max_tokens=10, stop_token_ids=(42,))
    run_one(r, [11, 42, 13])
    assert r.status is RequestStatus.FINISHED_STOPPED and r.stop_reason == 42
    assert r.output_token_ids == [11, 42]


def test_min_tokens_suppresses_eos_stop() -> None:
    r = req("a", 5, max_tokens=10, min_tokens=3)
    run_one(r, [EOS, EOS, EOS, 11])
    assert r.output_token_ids == [EOS, EOS, EOS]  # the third reaches min_tokens and stops
    assert r.status is RequestStatus.FINISHED_STOPPED


def test_ignore_eos_runs_to_max_tokens() -> None:
    r = req("a", 5, max_tokens=4, ignore_eos=True)
    run_one(r, [EOS] * 4)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 4


def test_max_tokens_finishes_with_length() -> None:
    r = req("a", 5, max_tokens=6)
    run_one(r, [])
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6
    assert r.stop_reason is None


def test_max_model_len_finishes_with_length() -> None:
    r = req("a", 30, max_tokens=None)
    run_one(r, [], max_model_len=40)
    assert r.status is RequestStatus.FINISHED_LENGTH and r.num_tokens == 40


def test_watermark_holds_back_admission_while_others_run() -> None:
    # 20 usable blocks of 16, watermark 0.1 = 2 blocks kept free for running requests.
    sched = make(num_blocks=21, max_model_len=320, watermark=0.1)
    sched.add_request(req("a", 16 * 10, first=0, max_tokens=50))
    step(sched, FakeRunner())  # a holds 10 blocks (admitted alone: no watermark)
    # a's decode takes an 11th block, leaving 9: b's 9 blocks fit, but not with 2 held back.
    sched.add_request(req("b", 16 * 9, first=5000, max_tokens=1))
    out, _ = step(sched, FakeRunner())
    assert [s.request_id for s in out.scheduled] == ["a"]
    assert sched.kv.num_free_blocks == 9
    sched.add_request(req("c", 16 * 7 - 1, first=9000, max_tokens=1, priority=-1))  # 7 + 2 fit
    out, _ = step(sched, FakeRunner())
    assert [s.request_id for s in out.scheduled] == ["a", "c"]


def test_pure_modules_do_not_import_torch() -> None:
    code = (
        "import sys, engine.kv.block_pool, engine.kv.kv_manager, engine.scheduler.policy,"
        " engine.scheduler.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
