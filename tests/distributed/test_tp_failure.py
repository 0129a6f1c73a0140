"""A follower that dies or hangs mid-generation fails the TP group within a bounded time, with
an error naming the rank; the leader never hangs and refuses further steps."""

from __future__ import annotations

import os
import signal
import time

import pytest

from engine import SamplingParams
from engine.config import EngineConfig
from engine.distributed import TPGroupError
from engine.engine import LLMEngine
from engine.executor.executor import TPState
from tests.distributed.tp_fixtures import prompts

BOUND_S = 30.0


def _engine_mid_generation(path) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(model=str(path), device="cpu", tensor_parallel_size=2), show_progress=False
    )
    for i, p in enumerate(prompts()):
        engine.add_request(
            str(i), p, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        )
    for _ in range(3):
        engine.step()
    return engine


def _step_until_error(engine: LLMEngine) -> tuple[TPGroupError, float]:
    start = time.monotonic()
    with pytest.raises(TPGroupError) as info:
        while time.monotonic() - start < 120:  # the bound is asserted below; this only stops a hang
            engine.step()
    return info.value, time.monotonic() - start


def test_killed_follower_fails_leader_naming_rank(checkpoints, local_ray):
    import ray

    engine = _engine_mid_generation(checkpoints["llama31"])
    assert engine.tp is not None
    ray.kill(engine.tp.followers[0], no_restart=True)
    err, elapsed = _step_until_error(engine)
    assert elapsed < BOUND_S, elapsed
    assert err.rank == 1 and "tensor-parallel rank 1 died" in str(err), str(err)
    assert engine.tp.state is TPState.FAILED
    with pytest.raises(TPGroupError, match="rank 1"):  # later steps fail at once, same error
        engine.step()
    engine.shutdown()


def test_hung_follower_fails_leader_within_bound(checkpoints, local_ray):
    """SIGSTOP freezes the follower: no socket closes, so only the timeouts can catch it."""
    engine = _engine_mid_generation(checkpoints["qwen2"])
    assert engine.tp is not None
    pid = engine.tp.follower_pids[0]  # recorded at start-up: run_loop now occupies the actor
    os.kill(pid, signal.SIGSTOP)
    try:
        err, elapsed = _step_until_error(engine)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert elapsed < BOUND_S, elapsed
    assert err.rank == 1 and "did not respond" in str(err), str(err)
    engine.shutdown()
