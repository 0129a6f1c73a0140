"""Tests of engine.sampler.Sampler (CPU; a subset also on CUDA, marked gpu): correctness against references, statistics of the
truncation stages with fixed seeds, seeded reproducibility, penalties, min_tokens, logprobs,
logit_bias and the structured-output bitmask."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch

from engine.sampler import Sampler, SamplerResult
from engine.sampling.grammar import GrammarCompiler, GrammarState, wait_any
from engine.sampling.seeds import step_seed
from engine.sampling_params import SamplingParams, StructuredOutput
from engine.scheduler.output import ScheduledRequest

CPU = torch.device("cpu")
NUM_DRAWS = 20_000
# Total-variation bound for NUM_DRAWS draws over <= 8 outcomes: the expected TV is ~0.005, so
# 0.02 is several standard deviations away; the draws are seeded, so the test is deterministic.
TV_BOUND = 0.02
# The tests that exercise device-specific code paths (generators, scatter, sort) also run on
# CUDA where one exists.
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"),
        ],
    ),
]


def make_request(
    params: SamplingParams,
    prompt: Sequence[int] = (0,),
    output: Sequence[int] = (),
    request_id: str = "r",
    grammar: GrammarState | None = None,
) -> ScheduledRequest:
    return ScheduledRequest(
        request_id=request_id,
        token_ids=[0],
        start_position=len(prompt) + len(output),
        block_ids=[1],
        sample=True,
        sampling_params=params,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        grammar=grammar,
    )


def run(
    sampler: Sampler, logits: torch.Tensor, params: Sequence[SamplingParams], **kwargs: object
) -> SamplerResult:
    return sampler(logits, [make_request(p, **kwargs) for p in params])  # type: ignore[arg-type]


def draw_many(
    probs: list[float], params: SamplingParams, seed: int = 1234, device: str = "cpu"
) -> torch.Tensor:
    """NUM_DRAWS samples (one batch) from logits log(probs) under `params`."""
    torch.manual_seed(seed)
    logits = torch.tensor(probs).log().expand(NUM_DRAWS, -1).contiguous().to(device)
    sampler = Sampler(len(probs), eos_token_ids=(), device=torch.device(device))
    return torch.tensor(run(sampler, logits, [params] * NUM_DRAWS).token_ids)


def total_variation(tokens: torch.Tensor, expected: torch.Tensor) -> float:
    empirical = torch.bincount(tokens, minlength=expected.numel()).double() / tokens.numel()
    return 0.5 * (empirical - expected.double()).abs().sum().item()


def nucleus_reference(probs: list[float], top_p: float) -> set[int]:
    """Plain-Python nucleus: smallest descending prefix whose mass >= top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept: set[int] = set()
    mass = 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


def restricted(probs: list[float], kept: set[int]) -> torch.Tensor:
    p = torch.tensor([probs[i] if i in kept else 0.0 for i in range(len(probs))])
    return p / p.sum()


# A small known distribution, shuffled so no stage can rely on sorted input.
PROBS = [0.05, 0.25, 0.02, 0.4, 0.1, 0.03, 0.15]


# ---------------------------------------------------------------- greedy and padded vocabulary


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax_and_ignores_padded_columns(dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(0)
    vocab, padded = 40, 48
    logits = torch.randn(6, padded).to(dtype)
    logits[:, vocab:] = 1000.0  # padding that would win if not masked
    logits = logits.to(device)
    sampler = Sampler(vocab, eos_token_ids=(), device=torch.device(device))
    expected = logits[:, :vocab].float().argmax(dim=-1).tolist()
    fast = run(sampler, logits, [SamplingParams(temperature=0.0)] * 6)
    full = run(sampler, logits, [SamplingParams(temperature=0.0, logprobs=1)] * 6)
    assert fast.token_ids == expected
    assert full.token_ids == expected
    assert fast.logprobs == [None] * 6


@pytest.mark.parametrize("device", DEVICES)
def test_sampled_rows_never_pick_padded_columns(device: str) -> None:
    vocab, padded = 10, 16
    logits = torch.zeros(NUM_DRAWS, padded)
    logits[:, vocab:] = 50.0
    logits = logits.to(device)
    sampler = Sampler(vocab, eos_token_ids=(), device=torch.device(device))
    tokens = torch.tensor(
        run(sampler, logits, [SamplingParams(temperature=1.0)] * NUM_DRAWS).token_ids
    )
    assert tokens.max().item() < vocab
    assert torch.unique(tokens).numel() == vocab  # uniform over the real vocabulary


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(2, 12)
    before = logits.clone()
    sampler = Sampler(12, eos_token_ids=(3,), device=CPU)
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, min_tokens=2, top_p=0.5)
    run(sampler, logits, [params, params], prompt=(1, 2), output=(4,))
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------- seeded sampling


def _generate(
    logits_per_step: list[torch.Tensor],
    target: SamplingParams,
    others: list[SamplingParams],
    position: int,
    device: str = "cpu",
) -> list[int]:
    """Tokens of `target` over several steps, sharing each step's batch with `others` at `position`."""
    sampler = Sampler(logits_per_step[0].numel(), eos_token_ids=(), device=torch.device(device))
    output: list[int] = []
    for step_logits in logits_per_step:
        params = others[:position] + [target] + others[position:]
        requests = [
            make_request(p, output=output if i == position else [7] * i, request_id=str(i))
            for i, p in enumerate(params)
        ]
        logits = torch.randn(len(params), step_logits.numel())
        logits[position] = step_logits
        output.append(sampler(logits.to(device), requests).token_ids[position])
    return output


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_reproduce_across_runs_batches_and_positions(device: str) -> None:
    torch.manual_seed(0)
    steps = [torch.randn(64) * 0.5 for _ in range(12)]
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    others = [
        SamplingParams(temperature=0.7, seed=i)
        if i % 2
        else SamplingParams(temperature=1.3, top_k=5)
        for i in range(8)
    ]
    alone = _generate(steps, target, [], 0, device)
    torch.manual_seed(99)  # a different default-generator state must not matter
    assert _generate(steps, target, others, 0, device) == alone
    assert _generate(steps, target, others, 5, device) == alone
    assert _generate(steps, target, others[:3], 3, device) == alone
    assert len(set(alone)) > 1  # the noise changes from step to step


def test_seeded_noise_changes_with_the_step() -> None:
    same_logits = [torch.zeros(64)] * 12
    tokens = _generate(same_logits, SamplingParams(seed=5), [], 0)
    assert len(set(tokens)) > 1


def test_different_seeds_give_different_tokens() -> None:
    torch.manual_seed(0)
    steps = [torch.randn(64) * 0.5 for _ in range(12)]
    first = _generate(steps, SamplingParams(seed=1), [], 0)
    second = _generate(steps, SamplingParams(seed=2), [], 0)
    assert first != second


def test_step_seed_is_stable_across_processes() -> None:
    # This process's str hashes are salted randomly; the child's with a fixed salt.
    code = "from engine.sampling.seeds import step_seed; print(step_seed(42, 7))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip()) == step_seed(42, 7)
    assert step_seed(42, 7) != step_seed(42, 8) != step_seed(43, 7)
    assert 0 <= step_seed(2**63 - 1, 10**9) < 2**63


def test_seeded_rows_follow_the_distribution() -> None:
    probs = torch.tensor(PROBS)
    sampler = Sampler(len(PROBS), eos_token_ids=(), device=CPU)
    n = 5000
    logits = probs.log().expand(n, -1).contiguous()
    tokens = torch.tensor(
        run(sampler, logits, [SamplingParams(seed=s) for s in range(n)]).token_ids
    )
    # Fewer draws than elsewhere: the bound is scaled by sqrt(NUM_DRAWS / n) = 2.
    assert total_variation(tokens, probs) < 2 * TV_BOUND


# ---------------------------------------------------------------- temperature and truncation


@pytest.mark.parametrize("device", DEVICES)
def test_unrestricted_sampling_matches_softmax(device: str) -> None:
    tokens = draw_many(PROBS, SamplingParams(temperature=1.0), device=device)
    assert total_variation(tokens, torch.tensor(PROBS)) < TV_BOUND


def test_temperature_scales_logits() -> None:
    tokens = draw_many(PROBS, SamplingParams(temperature=2.0))
    expected = torch.softmax(torch.tensor(PROBS).log() / 2.0, dim=-1)
    assert total_variation(tokens, expected) < TV_BOUND


def test_small_temperature_behaves_like_greedy() -> None:
    tokens = draw_many(PROBS, SamplingParams(temperature=1e-3))
    assert set(tokens.tolist()) == {PROBS.index(max(PROBS))}


@pytest.mark.parametrize("top_p", [1.0, 0.999])  # top-k alone, and top-k on the sort path
def test_top_k_never_leaves_the_k_highest(top_p: float) -> None:
    torch.manual_seed(3)
    vocab, k, rows = 50, 5, 4000
    base = torch.randperm(vocab).float() * 0.1  # distinct logits
    allowed = set(torch.topk(base, k).indices.tolist())
    params = [
        SamplingParams(temperature=3.0, top_k=k, top_p=top_p),
        SamplingParams(temperature=3.0),
    ]
    sampler = Sampler(vocab, eos_token_ids=(), device=CPU)
    out = run(sampler, base.expand(rows, -1).contiguous(), params * (rows // 2)).token_ids
    truncated, free = set(out[0::2]), set(out[1::2])
    assert truncated == allowed  # inside the top k, and every one of them reachable
    assert not free <= allowed  # the rows without top-k in the same batch are not truncated


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("top_p", [0.7, 0.5, 0.9])
def test_top_p_stays_in_nucleus_and_matches_renormalized(top_p: float, device: str) -> None:
    tokens = draw_many(PROBS, SamplingParams(top_p=top_p), device=device)
    nucleus = nucleus_reference(PROBS, top_p)
    assert set(tokens.tolist()) == nucleus
    assert total_variation(tokens, restricted(PROBS, nucleus)) < TV_BOUND


def test_top_p_always_keeps_the_top_token() -> None:
    tokens = draw_many(PROBS, SamplingParams(top_p=1e-6))
    assert set(tokens.tolist()) == {PROBS.index(max(PROBS))}


def test_top_p_after_top_k_uses_renormalized_mass() -> None:
    # top-3 renormalized: 0.4/0.8, 0.25/0.8, 0.15/0.8 = 0.5, 0.3125, 0.1875; top_p 0.75 keeps two.
    tokens = draw_many(PROBS, SamplingParams(top_k=3, top_p=0.75))
    kept = {PROBS.index(0.4), PROBS.index(0.25)}
    assert set(tokens.tolist()) == kept
    assert total_variation(tokens, restricted(PROBS, kept)) < TV_BOUND


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("min_p", [0.2, 0.5, 1.0])
def test_min_p_drops_improbable_tokens(min_p: float, device: str) -> None:
    tokens = draw_many(PROBS, SamplingParams(min_p=min_p, top_k=6), device=device)
    kept = {i for i, p in enumerate(PROBS) if p >= min_p * max(PROBS)}
    assert set(tokens.tolist()) == kept
    assert total_variation(tokens, restricted(PROBS, kept)) < TV_BOUND


def test_mixed_batch_applies_each_rows_own_truncation() -> None:
    torch.manual_seed(5)
    variants = [
        SamplingParams(top_p=0.5),
        SamplingParams(min_p=0.3),
        SamplingParams(top_k=2),
        SamplingParams(temperature=0.0),
        SamplingParams(top_p=0.9, min_p=0.05, seed=11),
    ]
    expected = [
        nucleus_reference(PROBS, 0.5),
        {i for i, p in enumerate(PROBS) if p >= 0.3 * 0.4},
        {PROBS.index(0.4), PROBS.index(0.25)},
        {PROBS.index(0.4)},
        nucleus_reference(PROBS, 0.9),
    ]
    rows = 1000 * len(variants)
    logits = torch.tensor(PROBS).log().expand(rows, -1).contiguous()
    sampler = Sampler(len(PROBS), eos_token_ids=(), device=CPU)
    out = run(sampler, logits, variants * 1000).token_ids
    for v, kept in enumerate(expected):
        seen = set(out[v :: len(variants)])
        assert seen <= kept
        if variants[v].seed is None:
            assert seen == kept


# ------------------------------------------------------------------------------------ penalties


def penalized_logprobs(
    logits: list[float],
    params: SamplingParams,
    prompt: Sequence[int],
    output: Sequence[int],
    device: str = "cpu",
) -> torch.Tensor:
    """The sampler's logprobs of every token (logprobs=V), read in vocabulary order."""
    vocab = len(logits)
    sampler = Sampler(vocab, eos_token_ids=(), device=torch.device(device))
    request = make_request(params, prompt=prompt, output=output)
    result = sampler(torch.tensor([logits], device=device), [request]).logprobs[0]
    assert result is not None and len(result.top) == vocab
    values = torch.empty(vocab)
    for token, lp in result.top:
        values[token] = lp
    return values


LOGITS = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0]


def test_repetition_penalty_matches_hand_reference() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=len(LOGITS))
    got = penalized_logprobs(LOGITS, params, prompt=[0, 1], output=[1, 3, 5])
    # seen {0, 1, 3, 5}: 2.0 / 2, -1.0 * 2, -3.0 * 2, 0.0 stays 0.0; 2 and 4 unseen.
    hand = torch.tensor([1.0, -2.0, 0.5, -6.0, 1.0, 0.0])
    torch.testing.assert_close(got, torch.log_softmax(hand, dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_matches_transformers(device: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    vocab = 20
    logits = (torch.randn(vocab) * 3).tolist()
    prompt, output = [3, 4, 4, 9], [9, 11, 0]
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.7)
    reference = processor(torch.tensor([prompt + output]), torch.tensor([logits]))[0]
    params = SamplingParams(temperature=0.0, repetition_penalty=1.7, logprobs=vocab)
    got = penalized_logprobs(logits, params, prompt=prompt, output=output, device=device)
    torch.testing.assert_close(got, torch.log_softmax(reference, dim=-1))


def test_presence_and_frequency_penalties_match_hand_reference() -> None:
    params = SamplingParams(
        temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=len(LOGITS)
    )
    got = penalized_logprobs(LOGITS, params, prompt=[1, 1], output=[2, 2, 4])
    # prompt tokens are not penalized; 2 occurs twice, 4 once.
    hand = torch.tensor([2.0, -1.0, 0.5 - 0.5 - 0.5, -3.0, 1.0 - 0.5 - 0.25, 0.0])
    torch.testing.assert_close(got, torch.log_softmax(hand, dim=-1))


def test_repetition_then_presence_frequency() -> None:
    params = SamplingParams(
        temperature=0.0,
        repetition_penalty=2.0,
        presence_penalty=-1.0,
        frequency_penalty=0.5,
        logprobs=len(LOGITS),
    )
    got = penalized_logprobs(LOGITS, params, prompt=[0], output=[3, 3])
    hand = torch.tensor([1.0, -1.0, 0.5, -6.0 + 1.0 - 1.0, 1.0, 0.0])
    torch.testing.assert_close(got, torch.log_softmax(hand, dim=-1))


def test_penalties_touch_only_their_rows_and_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0]] * 2)
    sampler = Sampler(3, eos_token_ids=(), device=CPU)
    penalized = make_request(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[0])
    plain = make_request(SamplingParams(temperature=0.0, logprobs=3), output=[0])
    result = sampler(logits, [penalized, plain])
    assert result.token_ids == [1, 0]
    plain_lp = result.logprobs[1]
    assert plain_lp is not None
    assert dict(plain_lp.top) == pytest.approx(
        dict(enumerate(torch.log_softmax(logits[1], -1).tolist()))
    )


# ----------------------------------------------------------------------------------- min_tokens


@pytest.mark.parametrize("device", DEVICES)
def test_min_tokens_forbids_eos_and_stop_ids_until_reached(device: str) -> None:
    vocab, eos, stop = 8, 7, 5
    logits = torch.zeros(1, vocab)
    logits[0, eos], logits[0, stop] = 10.0, 9.0
    logits = logits.to(device)
    sampler = Sampler(vocab, eos_token_ids=(eos,), device=torch.device(device))
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(stop,), logprobs=vocab)
    for produced in range(3):
        result = sampler(logits, [make_request(params, output=[1] * produced)])
        assert result.token_ids[0] not in (eos, stop)
        lp = result.logprobs[0]
        assert lp is not None and dict(lp.top)[eos] == float("-inf") == dict(lp.top)[stop]
    assert sampler(logits, [make_request(params, output=[1] * 3)]).token_ids == [eos]


def test_min_tokens_with_ignore_eos_forbids_only_stop_ids() -> None:
    vocab, eos, stop = 8, 7, 5
    logits = torch.zeros(1, vocab)
    logits[0, stop], logits[0, eos] = 10.0, 9.0
    sampler = Sampler(vocab, eos_token_ids=(eos,), device=CPU)
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(stop,), ignore_eos=True)
    assert sampler(logits, [make_request(params)]).token_ids == [eos]


def test_min_tokens_holds_for_sampled_rows() -> None:
    vocab, eos = 6, 0
    logits = torch.zeros(4000, vocab)
    sampler = Sampler(vocab, eos_token_ids=(eos,), device=CPU)
    params = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=(3,))
    tokens = set(run(sampler, logits, [params] * 4000).token_ids)
    assert tokens == {1, 2, 4, 5}


# ------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_match_log_softmax_reference(device: str) -> None:
    torch.manual_seed(7)
    vocab = 30
    logits = torch.randn(5, vocab) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=4, logprobs=20),  # logprobs ignore temperature/top-k
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.0, logprobs=1),
    ]
    sampler = Sampler(vocab, eos_token_ids=(), device=torch.device(device))
    result = run(sampler, logits.to(device), params)
    reference = torch.log_softmax(logits, dim=-1)
    for row, p in enumerate(params):
        lp = result.logprobs[row]
        if p.logprobs is None:
            assert lp is None
            continue
        assert lp is not None
        token = result.token_ids[row]
        assert lp.logprob == pytest.approx(reference[row, token].item(), abs=1e-5)
        values, ids = torch.topk(reference[row], p.logprobs)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
    assert result.logprobs[2] is not None and result.logprobs[2].top == []


# ---------------------------------------------------------------------------------- logit_bias


@pytest.mark.parametrize("device", DEVICES)
def test_logit_bias_bans_forces_and_touches_only_its_rows(device: str) -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]] * 4).to(device)
    sampler = Sampler(4, eos_token_ids=(), device=torch.device(device))
    params = [
        SamplingParams(temperature=0.0, logit_bias={2: -100.0}),  # bans the argmax
        SamplingParams(temperature=0.0, logit_bias={3: 100.0}),  # forces the worst token
        SamplingParams(temperature=1.0, seed=5, logit_bias={0: 100.0, 1: -100.0}),
        SamplingParams(temperature=0.0),
    ]
    assert run(sampler, logits, params).token_ids == [1, 3, 0, 2]


def test_logit_bias_is_added_before_logprobs() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    sampler = Sampler(3, eos_token_ids=(), device=CPU)
    params = SamplingParams(temperature=0.0, logit_bias={0: 1.5, 2: -0.5}, logprobs=3)
    lp = run(sampler, logits, [params]).logprobs[0]
    assert lp is not None
    expected = torch.log_softmax(torch.tensor([2.5, 2.0, 2.5]), dim=-1)
    assert dict(lp.top) == pytest.approx(dict(enumerate(expected.tolist())))


# ------------------------------------------------------------------------- structured output

EOS_ID = 0
NUM_ROWS_GRAMMAR = 40
GRAMMAR_VOCAB = [b"</s>", b"a", b"b", b"c", b"ab", b"{", b"}", b"x"]


@pytest.fixture(scope="module")
def grammar_compiler() -> GrammarCompiler:
    compiler = GrammarCompiler.from_vocab(GRAMMAR_VOCAB, len(GRAMMAR_VOCAB), [EOS_ID])
    yield compiler
    compiler.shutdown()


def ready(compiler: GrammarCompiler, regex: str) -> GrammarState:
    state = compiler.state(StructuredOutput("regex", regex))
    wait_any([state], 10)
    assert state.ready, state.error
    return state


@pytest.mark.parametrize("device", DEVICES)
def test_grammar_mask_binds_greedy_and_sampled_rows_only(
    device: str, grammar_compiler: GrammarCompiler
) -> None:
    """Regex "ab?c" after "a": only "b" or "c" may follow, whatever the logits prefer."""
    vocab = len(GRAMMAR_VOCAB)
    logits = torch.zeros(NUM_ROWS_GRAMMAR, vocab)
    logits[:, 7] = 10.0  # "x": the favourite, never allowed
    logits[:, 2] = 1.0
    sampler = Sampler(vocab, eos_token_ids=(EOS_ID,), device=torch.device(device))
    greedy = SamplingParams(temperature=0.0)
    rows = [
        make_request(greedy, output=[1], grammar=ready(grammar_compiler, "ab?c")),
        make_request(greedy),
    ] + [
        make_request(
            SamplingParams(temperature=1.0, seed=seed),
            output=[1],
            grammar=ready(grammar_compiler, "ab?c"),
        )
        for seed in range(NUM_ROWS_GRAMMAR - 2)
    ]
    result = sampler(logits.to(device), rows)
    assert result.token_ids[0] == 2 and result.token_ids[1] == 7
    assert set(result.token_ids[2:]) <= {2, 3} and len(set(result.token_ids[2:])) == 2
    assert sampler.grammar_mask.fill_seconds > 0.0


def test_a_complete_grammar_allows_only_eos(grammar_compiler: GrammarCompiler) -> None:
    logits = torch.zeros(1, len(GRAMMAR_VOCAB))
    logits[0, 1] = 5.0
    sampler = Sampler(len(GRAMMAR_VOCAB), eos_token_ids=(EOS_ID,), device=CPU)
    row = make_request(
        SamplingParams(temperature=0.0), output=[4], grammar=ready(grammar_compiler, "ab")
    )
    assert sampler(logits, [row]).token_ids == [EOS_ID]


def test_rows_without_grammar_or_bias_take_the_fast_path() -> None:
    sampler = Sampler(4, eos_token_ids=(), device=CPU)
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.2]])
    assert run(sampler, logits, [SamplingParams(temperature=0.0)]).token_ids == [1]
    assert sampler.grammar_mask.fill_seconds == 0.0
