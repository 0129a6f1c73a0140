"""The incremental n-gram index (engine.spec.ngram.NgramIndex) against the reference scan
`propose_ngram`, and the engine's NgramProposer that keeps one index per request."""

from __future__ import annotations

import random

import pytest

from engine.sampling_params import SamplingParams
from engine.scheduler.output import ScheduledRequest
from engine.spec.config import SpeculativeConfig
from engine.spec.ngram import NgramIndex, propose_ngram
from engine.spec.proposer import NgramProposer


def _indexed(tokens: list[int], min_n: int, max_n: int) -> NgramIndex:
    index = NgramIndex(min_n, max_n)
    index.extend(tokens)
    return index


@pytest.mark.parametrize("seed", range(40))
def test_matches_reference_after_every_append(seed: int) -> None:
    rng = random.Random(seed)
    min_n = rng.randint(1, 4)
    max_n = rng.randint(min_n, 6)
    vocab = rng.choice([1, 2, 3, 5, 8])  # small: n-grams recur, often overlapping the tail
    index = NgramIndex(min_n, max_n)
    tokens: list[int] = []
    assert index.propose(3) == propose_ngram(tokens, 3, min_n, max_n) == []
    for _ in range(rng.randint(1, 120)):
        token = rng.randrange(vocab)
        tokens.append(token)
        index.extend([token])
        k = rng.randint(0, 7)
        assert index.propose(k) == propose_ngram(tokens, k, min_n, max_n), (tokens, k)


@pytest.mark.parametrize("seed", range(20))
def test_chunked_extend_matches_reference(seed: int) -> None:
    rng = random.Random(1000 + seed)
    min_n = rng.randint(1, 3)
    max_n = rng.randint(min_n, 5)
    index = NgramIndex(min_n, max_n)
    tokens: list[int] = []
    while len(tokens) < 300:
        chunk = [rng.randrange(4) for _ in range(rng.randint(0, 40))]
        tokens.extend(chunk)
        index.extend(chunk)
        assert index.num_tokens == len(tokens)
        for k in (1, 4):
            assert index.propose(k) == propose_ngram(tokens, k, min_n, max_n)


def test_edge_cases() -> None:
    # shorter than any n: nothing to match
    assert _indexed([], 1, 3).propose(2) == []
    assert _indexed([7], 1, 3).propose(2) == []
    assert _indexed([7, 8], 2, 3).propose(2) == propose_ngram([7, 8], 2, 2, 3) == []
    # a repeated single token: the latest match overlaps the tail, leaves one follower
    for length in range(1, 8):
        tokens = [4] * length
        for k in (1, 3, 9):
            assert _indexed(tokens, 1, 2).propose(k) == propose_ngram(tokens, k, 1, 2)
    assert _indexed([4, 4, 4, 4], 1, 2).propose(3) == [4]
    # the tail never matches itself; the match at position 0 is found
    assert _indexed([1, 2, 3, 1, 2], 2, 2).propose(5) == [3, 1, 2]
    assert _indexed([1, 2, 1, 2], 2, 2).propose(5) == [1, 2]
    # the longest n wins over a later shorter match; the latest of equal n wins
    assert _indexed([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 1, 3).propose(2) == [7, 1]
    assert _indexed([5, 1, 2, 6, 3, 2, 8, 1, 2], 1, 2).propose(1) == [6]
    assert _indexed([1, 2, 1, 3, 1], 2, 3).propose(4) == []
    assert _indexed([1, 2, 1, 3, 1], 1, 3).propose(4) == [3, 1]


def test_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(0, 2)
    with pytest.raises(ValueError, match="min_n"):
        NgramIndex(3, 2)


def _row(rid: str, prompt: list[int], output: list[int], k: int) -> ScheduledRequest:
    last = (prompt + output)[-1]
    return ScheduledRequest(
        request_id=rid,
        token_ids=[last],
        start_position=len(prompt) + len(output) - 1,
        block_ids=[0],
        sample=True,
        sampling_params=SamplingParams(),
        prompt_token_ids=prompt,
        output_token_ids=output,
        num_lookahead=k,
    )


def _proposer(min_n: int = 1, max_n: int = 3) -> NgramProposer:
    return NgramProposer(
        SpeculativeConfig(
            "ngram", num_speculative_tokens=4, prompt_lookup_min=min_n, prompt_lookup_max=max_n
        )
    )


def test_proposer_follows_growing_requests() -> None:
    rng = random.Random(7)
    proposer = _proposer()
    prompts = {f"r{i}": [rng.randrange(5) for _ in range(rng.randint(1, 30))] for i in range(6)}
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    for _ in range(60):
        rows = [_row(rid, prompts[rid], outputs[rid], rng.randint(1, 4)) for rid in prompts]
        skipped = rng.random() < 0.2  # a step without lookahead: the index lags, then catches up
        if not skipped:
            drafts = proposer.propose(rows)
            for row, got in zip(rows, drafts):
                seq = row.prompt_token_ids + row.output_token_ids
                assert got == propose_ngram(seq, row.num_lookahead, 1, 3)
        for rid in prompts:
            outputs[rid].extend(rng.randrange(5) for _ in range(rng.randint(1, 3)))
    assert proposer.num_tracked == len(prompts)
    proposer.forget(["r0", "never-seen"])
    assert proposer.num_tracked == len(prompts) - 1
    proposer.forget(list(prompts))
    assert proposer.num_tracked == 0


@pytest.mark.parametrize(
    ("prompt", "output"),
    [
        ([9, 9, 1, 2, 3], []),  # id reused: another prompt length
        ([1, 2, 3, 1, 2], [3, 1, 2, 7, 2]),  # id reused: other last indexed token
        ([8, 2, 3, 1, 2], [3, 1, 2, 3, 8]),  # id reused: other first token
        ([1, 2, 3, 1, 2], []),  # recomputed from a shorter sequence
    ],
)
def test_proposer_rebuilds_a_stale_index(prompt: list[int], output: list[int]) -> None:
    proposer = _proposer()
    first = _row("r", [1, 2, 3, 1, 2], [3, 1, 2, 3], 2)
    assert proposer.propose([first]) == [[1, 2]]
    row = _row("r", prompt, output, 2)
    assert proposer.propose([row]) == [propose_ngram(prompt + output, 2, 1, 3)]
    assert proposer.num_tracked == 1
