"""An LLM's lifetime at tensor_parallel_size=2 (CPU: gloo and local Ray actors): closing it,
leaving its `with` block or dropping it releases the followers (their processes exit), the
placement group, the process groups and the watchdog thread, so another TP group starts in
the same process and generates the same tokens. Errors name the rank that caused them."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.distributed import TPGroupError
from engine.executor.ray_launch import wait_exited
from engine.llm import LLMClosedError
from tests.distributed.tp_fixtures import prompts
from tests.engine import tiny_models

pytestmark = pytest.mark.usefixtures("local_ray")
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8)
TP_THREADS = ("tp-watchdog", "tp-teardown")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("qwen3", tmp_path_factory.mktemp("tp_lifetime"))


def _tp2(path: Path) -> LLM:
    return LLM(str(path), device="cpu", show_progress=False, tensor_parallel_size=2)


def _generate(llm: LLM) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts()[:3], GREEDY)]


def _tp_threads(wait_s: float) -> list[str]:
    deadline = time.monotonic() + wait_s
    while True:
        names = [t.name for t in threading.enumerate() if t.name.startswith(TP_THREADS)]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.05)


def _assert_released(followers: list, pids: list[int], wait_s: float = 0.0) -> None:
    """No follower actor or process is left, no placement group is held, no TP thread runs
    (after `wait_s`: 0 after a close, which returns only once all of that holds)."""
    import ray

    assert wait_exited(pids, wait_s) == []
    for actor in followers:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.__ray_ready__.remote(), timeout=30)
    held = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert held == []
    assert _tp_threads(wait_s) == []


def test_close_with_block_then_garbage_collection(checkpoint):
    """The first LLM is closed by its `with` block, the second by `del` and a collection; each
    releases everything, and both (and a third) generate the same greedy tokens."""
    with _tp2(checkpoint) as first:
        assert first.engine.tp is not None
        followers, pids = list(first.engine.tp.followers), list(first.engine.tp.follower_pids)
        reference = _generate(first)
    assert first.closed
    _assert_released(followers, pids)
    first.close()  # idempotent
    with pytest.raises(LLMClosedError):
        first.generate(prompts()[:1], GREEDY)

    second = _tp2(checkpoint)
    assert second.engine.tp is not None
    followers, pids = list(second.engine.tp.followers), list(second.engine.tp.follower_pids)
    assert _generate(second) == reference
    del second
    gc.collect()
    _assert_released(followers, pids)

    with _tp2(checkpoint) as third:
        assert _generate(third) == reference


def test_open_group_blocks_a_second_one_and_says_why(checkpoint):
    """A process holds one TP group at a time: starting another while the first is open fails
    at once, naming rank 0 (this process) and the open group, not an unresponsive follower."""
    with _tp2(checkpoint) as first:
        still_open = "earlier TP group in this process is still open"
        with pytest.raises(TPGroupError, match=still_open) as err:
            _tp2(checkpoint)
        assert err.value.rank == 0
        assert "did not respond" not in str(err.value)
        assert len(_generate(first)) == 3  # the open group is unaffected


def test_rank0_failure_names_rank0_and_releases_followers(checkpoint, monkeypatch):
    """Rank 0 failing on its own (here: building its runner) is reported as rank 0, not as a
    follower that did not respond; the started followers are released (a failure does not
    wait for their processes to exit: its error must surface within its bound)."""
    import ray

    import engine.engine as engine_module
    from engine.executor import executor as executor_module

    launched = []
    real_launch = executor_module.TPExecutor.launch

    def launch(*args, **kwargs):
        launched.append(real_launch(*args, **kwargs))
        return launched[-1]

    def broken_runner(*args, **kwargs):
        raise ValueError("rank 0 cannot build its runner")

    monkeypatch.setattr(executor_module.TPExecutor, "launch", launch)
    monkeypatch.setattr(engine_module, "ModelRunner", broken_runner)
    with pytest.raises(TPGroupError, match="rank 0 failed: ValueError") as err:
        _tp2(checkpoint)
    assert err.value.rank == 0 and "cannot build its runner" in str(err.value)
    (tp,) = launched
    _assert_released(tp.followers, tp.follower_pids, wait_s=30.0)
    assert ray.is_initialized()
