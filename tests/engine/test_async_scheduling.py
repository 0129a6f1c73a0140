"""Overlap scheduling (`async_scheduling=True`) on the CPU, float32: the engine launches step
N+1 before step N's tokens reach the host, feeding them from device memory.

Greedy output equals the step-by-step engine's token for token on tiny models of two
architectures, with chunked prefill, prefix hits, preemption, max_tokens and stop tokens, and
rows that cannot overlap (penalties, min_tokens, seeds, logprobs) in the mix. An abort, a
preemption and a stop string landing while the next step is already in flight lose nothing:
no token after the stop, every block free at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine import tiny_models

SHAPE = dict(num_kv_blocks=24, block_size=8, max_num_batched_tokens=32, max_model_len=160)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-overlap")
    return {name: tiny_models.build(name, root) for name in ("llama31", "qwen3")}


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    base = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 17, 40, 70, 9)]
    return base + base[1:3]  # repeats: prefix-cache hits


def _params(stop_token: int) -> list[SamplingParams]:
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=40),
        SamplingParams(temperature=0.0, max_tokens=7),
        SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(stop_token,)),
        SamplingParams(temperature=0.0, max_tokens=25, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=5, logprobs=2),
        SamplingParams(temperature=0.8, max_tokens=12, seed=7),
        SamplingParams(temperature=0.0, max_tokens=1),
    ]
    return [kinds[i % len(kinds)] for i in range(len(_prompts()))]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _llm(path: Path, overlap: bool, device: str = "cpu") -> LLM:
    return LLM(str(path), device=device, show_progress=False, async_scheduling=overlap, **SHAPE)


def _free(llm: LLM) -> bool:
    kv = llm.engine.kv_manager
    return kv.num_free_blocks == kv.num_usable_blocks and not llm.engine.has_unfinished()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama31", "qwen3"])
def test_overlap_equals_step_by_step(checkpoints: dict[str, Path], arch: str, device: str) -> None:
    """On CUDA both engines run the Triton kernels and the overlapped one its CUDA graphs."""
    plain = _llm(checkpoints[arch], overlap=False, device=device)
    first = plain.generate(_prompts()[:1], SamplingParams(temperature=0.0, max_tokens=8))
    stop = first[0].token_ids[4]  # the third kind's prompt may stop on it
    params = _params(stop)
    want = plain.generate(_prompts(), params)
    llm = _llm(checkpoints[arch], overlap=True, device=device)
    have = llm.generate(_prompts(), params)
    for w, h in zip(want, have):
        assert h.token_ids == w.token_ids
        assert h.finish_reason == w.finish_reason
        if w.logprobs is not None:
            assert h.logprobs is not None and len(h.logprobs) == len(w.logprobs)
            for a, b in zip(w.logprobs, h.logprobs):
                assert a.top[0][0] == b.top[0][0]
    engine = llm.engine
    assert engine.num_overlapped_steps > 0, "no step overlapped"
    assert _free(llm)


def _step_until_in_flight(llm: LLM, max_steps: int = 200) -> list:
    outputs = []
    for _ in range(max_steps):
        outputs += llm.engine.step()
        if llm.engine._inflight is not None and llm.engine.scheduler.num_running:
            return outputs
    raise AssertionError("no step stayed in flight")


def test_abort_while_next_step_in_flight(checkpoints: dict[str, Path]) -> None:
    llm = _llm(checkpoints["llama31"], overlap=True)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=30)
    for i, prompt in enumerate(_prompts()[:3]):
        engine.add_request(f"r{i}", prompt, params)
    outputs = _step_until_in_flight(llm)
    outputs += engine.step()  # r1 now has a token in flight
    aborted = engine.abort(["r1"])
    assert [r.request_id for r in aborted] == ["r1"]
    count_at_abort = len(aborted[0].output_token_ids)
    while engine.has_unfinished():
        outputs += engine.step()
    assert len(aborted[0].output_token_ids) == count_at_abort, "a token after the abort"
    assert not [o for o in outputs if o.request_id == "r1" and o.finished]
    finals = {o.request_id: o for o in outputs if o.finished}
    assert sorted(finals) == ["r0", "r2"]
    want = _llm(checkpoints["llama31"], overlap=False).generate(_prompts()[:3], params)
    assert finals["r0"].token_ids == want[0].token_ids
    assert finals["r2"].token_ids == want[2].token_ids
    assert _free(llm)


def test_preemption_while_next_step_in_flight(checkpoints: dict[str, Path]) -> None:
    """A pool too small for every request: preemptions hit requests with a token in flight
    (it is kept, and the request waits for it before its recompute)."""
    path = checkpoints["qwen3"]
    params = SamplingParams(temperature=0.0, max_tokens=48)
    prompts = [p for p in _prompts() if len(p) < 50]
    small = dict(SHAPE, num_kv_blocks=14, max_model_len=96)
    kwargs = dict(device="cpu", show_progress=False, **small)
    want = LLM(str(path), async_scheduling=False, **kwargs).generate(prompts, params)
    llm = LLM(str(path), async_scheduling=True, **kwargs)
    have = llm.generate(prompts, params)
    assert [h.token_ids for h in have] == [w.token_ids for w in want]
    assert llm.engine.scheduler.stats().num_preemptions_total > 0
    assert llm.engine.num_overlapped_steps > 0
    assert _free(llm)


def test_stop_string_while_next_step_in_flight() -> None:
    """SmolLM2 (a real tokenizer): the stop string ends the request at its token although the
    next step, already launched, computed one more; that token never shows."""
    prompt = "The capital of France is"
    params = SamplingParams(temperature=0.0, max_tokens=24)
    kwargs = dict(device="cpu", dtype="float32", show_progress=False)
    plain = LLM("demo", async_scheduling=False, **kwargs)
    text = plain.generate([prompt], params)[0].text
    stop = text.split()[2]  # a word a few tokens in
    stopped = SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,))
    want = plain.generate([prompt], stopped)[0]
    llm = LLM("demo", async_scheduling=True, **kwargs)
    have = llm.generate([prompt], stopped)[0]
    assert have.text == want.text and stop not in have.text
    assert have.token_ids == want.token_ids and have.finish_reason == "stop"
    assert llm.engine.num_overlapped_steps > 0
    assert _free(llm)


def test_ngram_speculation_overlaps_only_where_it_is_off(checkpoints: dict[str, Path]) -> None:
    """With speculation off above 2 running requests, the large batch overlaps its steps and
    the tail (2 or fewer) verifies drafts step by step; output equals no speculation."""
    path = checkpoints["llama31"]
    params = SamplingParams(temperature=0.0, max_tokens=40)
    prompts = _prompts() + [list(range(10, 30)) * 3]  # repetitive: drafts get accepted
    want = _llm(path, overlap=False).generate(prompts, params)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 2}
    llm = LLM(
        str(path), device="cpu", show_progress=False, async_scheduling=True,
        speculative_config=spec, **SHAPE,
    )  # fmt: skip
    have = llm.generate(prompts, params)
    assert [h.token_ids for h in have] == [w.token_ids for w in want]
    assert llm.engine.num_overlapped_steps > 0
    assert llm.engine.scheduler.num_draft_tokens_total > 0
    assert _free(llm)
