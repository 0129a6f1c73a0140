"""Preemption by swap: a preempted request's KV waits in the CPU tier and comes back at
re-admission; the tokens equal a run without preemption, and an abort drops the swapped copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from kvtransfer.cache_view import KVCacheView
from kvtransfer.tiers.engine_cache import TieredSwap
from kvtransfer.tiers.store import TieredStore
from tests.engine import tiny_models

GREEDY = SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32)
# no min_tokens (it reads the output on the host): these steps overlap
GREEDY_NO_EOS = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("llama31", tmp_path_factory.mktemp("tiny"))


def _swapping_llm(path: Path, overlap: bool = False) -> tuple[LLM, TieredSwap, TieredStore]:
    llm = LLM(
        str(path), device="cpu", show_progress=False, num_kv_blocks=27, async_scheduling=overlap
    )
    view = KVCacheView(llm.engine.runner.kv_cache)
    store = TieredStore(
        view, model_salt=llm.engine.kv_manager.salt, cpu_bytes=64 * view.bytes_per_block()
    )
    swap = TieredSwap(store, view)
    llm.engine.attach_preemption_swap(swap)
    return llm, swap, store


@pytest.mark.parametrize("overlap", [False, True])
def test_swapped_preemption_gives_the_same_tokens(checkpoint: Path, overlap: bool) -> None:
    """With overlap scheduling a request may be swapped out while the step in flight still
    writes its newest token's KV: the copy is ordered after it on the device stream."""
    prompts = tiny_models.mixed_prompts()
    params = GREEDY_NO_EOS if overlap else GREEDY
    reference = [
        o.token_ids
        for o in LLM(str(checkpoint), device="cpu", show_progress=False).generate(prompts, params)
    ]
    llm, swap, store = _swapping_llm(checkpoint, overlap)
    outs = llm.generate(prompts, params)
    assert llm.engine.stats().num_preemptions_total > 0
    assert llm.engine.num_overlapped_steps > 0 or not overlap
    assert swap.num_swapped_in > 0 and swap.num_swapped_in == swap.num_swapped_out
    assert [o.token_ids for o in outs] == reference
    llm.engine.scheduler.kv.pool.check_integrity()
    store.close()


def test_abort_of_a_swapped_request_drops_its_copy(checkpoint: Path) -> None:
    llm, swap, store = _swapping_llm(checkpoint)
    engine = llm.engine
    for i, p in enumerate(tiny_models.mixed_prompts()):
        engine.add_request(str(i), p, GREEDY)
    swapped = []
    while engine.has_unfinished() and not swapped:
        engine.step()
        swapped = [r for r in engine.scheduler.waiting_requests() if r.num_swapped_tokens]
    assert swapped, "no request was swapped out"
    engine.abort([r.request_id for r in swapped])
    assert not swap._handles or all(r.request_id not in swap._handles for r in swapped)
    engine.abort([str(i) for i in range(8)])
    assert engine.stats().num_free_blocks == engine.stats().num_usable_blocks
    store.close()
