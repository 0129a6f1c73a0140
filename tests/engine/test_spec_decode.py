"""Speculative decoding in the engine: exact greedy output, the target's distribution when
sampling, and clear errors for bad settings (float32, CPU).

Exactness runs every tiny architecture with the n-gram proposer, with chunked prefill (a small
token budget), prefix hits (each prompt twice), preemption (a small pool) and penalties,
min_tokens and logprobs in the mix. Model-based proposers are tested in test_spec_models.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import EngineConfigError
from engine.sampler import Sampler
from engine.scheduler.output import ScheduledRequest
from engine.spec.config import SpeculativeConfig
from engine.spec.ngram import propose_ngram
from engine.spec.verify import Verifier
from tests.engine import tiny_models

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-spec")
    return {name: tiny_models.build(name, root) for name in tiny_models.ARCHS}


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    base = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (3, 17, 40, 70)]
    looped = [list(range(10, 30)) * 3]  # repetitive text: the n-gram proposer gets matches
    return base + looped + base[1:3]  # repeats: prefix-cache hits


def _generate(path: Path, params: list[SamplingParams], **kwargs) -> tuple[list, LLM]:
    llm = LLM(str(path), device="cpu", show_progress=False, **kwargs)
    return llm.generate(_prompts(), params), llm


def _params() -> list[SamplingParams]:
    kinds = [
        SamplingParams(temperature=0.0, max_tokens=40),
        SamplingParams(temperature=0.0, max_tokens=33, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=24, min_tokens=20, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=30, frequency_penalty=0.5),
    ]
    return [kinds[i % len(kinds)] for i in range(len(_prompts()))]


@pytest.mark.parametrize("arch", tiny_models.ARCHS)
def test_greedy_with_ngram_equals_greedy_without(checkpoints: dict[str, Path], arch: str) -> None:
    shape = dict(num_kv_blocks=24, block_size=8, max_num_batched_tokens=32, max_model_len=160)
    want, _ = _generate(checkpoints[arch], _params(), **shape)
    have, llm = _generate(checkpoints[arch], _params(), speculative_config=NGRAM, **shape)
    for w, h in zip(want, have):
        assert h.token_ids == w.token_ids
        assert h.finish_reason == w.finish_reason
        if w.logprobs is not None:
            assert h.logprobs is not None and len(h.logprobs) == len(w.logprobs)
            for a, b in zip(w.logprobs, h.logprobs):
                assert a.top[0][0] == b.top[0][0]
                assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
    sched = llm.engine.scheduler
    assert sched.num_accepted_tokens_total > 0, "the repetitive prompt should accept drafts"
    assert sched.stats().num_preemptions_total > 0, "the small pool should preempt"
    assert llm.engine.kv_manager.num_free_blocks == llm.engine.kv_manager.num_usable_blocks


def test_ngram_proposes_what_followed_the_latest_match() -> None:
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 1, 3) == [7, 1]
    assert propose_ngram([5, 6, 7], 3, 1, 2) == []
    assert propose_ngram([4, 4, 4, 4], 3, 1, 2) == [4]  # a match must leave a follower
    assert propose_ngram([1, 2, 1, 3, 1], 4, 2, 3) == []  # no 2-gram recurs
    assert propose_ngram([1, 2, 1, 3, 1], 4, 1, 3) == [3, 1]


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"method": "lookahead-magic", "num_speculative_tokens": 2}, "method"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, "k"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
        ({"num_speculative_tokens": 2}, "method"),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5},
            "prompt_lookup_min",
        ),
    ],
)
def test_bad_speculative_config_names_the_field(config: dict, field: str) -> None:
    with pytest.raises(EngineConfigError, match=f"speculative_config.{field}"):
        SpeculativeConfig.parse(config)


def test_k_too_large_for_max_model_len_is_refused(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(EngineConfigError, match="speculative_config.num_speculative_tokens"):
        LLM(
            str(checkpoints["llama31"]),
            device="cpu",
            show_progress=False,
            max_model_len=8,
            speculative_config={"method": "ngram", "num_speculative_tokens": 8},
        )
    with pytest.raises(EngineConfigError, match="speculative_config: not JSON"):
        SpeculativeConfig.parse("{method: ngram")


# ----------------------------------------------------------------- distribution

VOCAB = 8
TARGET = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02])
CHI2_99_9 = {7: 24.32, 6: 22.46, 5: 20.52, 4: 18.47}  # the 99.9% quantiles, by degrees of freedom


def _rows(n: int, params: SamplingParams, draft: int) -> list[ScheduledRequest]:
    return [
        ScheduledRequest(
            request_id=f"r{i}",
            token_ids=[1, draft],
            start_position=5,
            block_ids=[1],
            sample=True,
            sampling_params=params,
            prompt_token_ids=[1, 2, 3, 4, 5],
            output_token_ids=[1],
            num_draft_tokens=1,
        )
        for i in range(n)
    ]


def _first_tokens(verifier: Verifier, params: SamplingParams, draft: int, n: int) -> torch.Tensor:
    logits = TARGET.log().repeat(2 * n, 1)  # both rows of each request: the same target p
    verdicts = verifier(logits, _rows(n, params, draft))
    firsts = [v.accepted[0] if v.accepted else v.final_token for v in verdicts]
    return torch.bincount(torch.tensor(firsts), minlength=VOCAB).float()


def _expected(params: SamplingParams) -> torch.Tensor:
    p = TARGET.clone()
    if params.top_p < 1.0:  # the nucleus: the smallest set of top tokens with mass >= top_p
        order = torch.argsort(p, descending=True)
        cum = torch.cumsum(p[order], 0)
        keep = order[: int((cum < params.top_p).sum()) + 1]
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[keep] = True
        p = torch.where(mask, p, torch.zeros_like(p))
    return p / p.sum()


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    n = counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the target's support was emitted"
    e = expected[support] * n
    return float(((counts[support] - e) ** 2 / e).sum()), int(support.sum()) - 1


class _WrongResidual(Verifier):
    """On rejection, resample from p itself (forgetting to remove the draft): biased."""

    def _draw(self, processed, rows, row_drafts, sampled, argmax):  # type: ignore[override]
        return super()._draw(processed, rows, [None] * len(row_drafts), sampled, argmax)[0], [
            c for c in super()._draw(processed, rows, row_drafts, sampled, argmax)[1]
        ]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("draft", [0, 3, 7])
def test_sampling_with_drafts_keeps_the_target_distribution(top_p: float, draft: int) -> None:
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=top_p, max_tokens=8)
    verifier = Verifier(Sampler(VOCAB, (), torch.device("cpu")))
    counts = _first_tokens(verifier, params, draft, 20_000)
    stat, dof = _chi2(counts, _expected(params))
    assert stat < CHI2_99_9[dof], (stat, counts.tolist())


def test_the_chi_square_test_catches_a_wrong_residual() -> None:
    """The same test, on a verifier that resamples from p (not p minus the draft) on rejection,
    fails: the sample size is large enough to see the bias."""
    torch.manual_seed(0)
    params = SamplingParams(temperature=1.0, max_tokens=8)
    counts = _first_tokens(
        _WrongResidual(Sampler(VOCAB, (), torch.device("cpu"))), params, 0, 20_000
    )
    stat, dof = _chi2(counts, _expected(params))
    assert stat > CHI2_99_9[dof]


def test_seeded_sampling_with_speculation_is_reproducible(checkpoints: dict[str, Path]) -> None:
    params = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=24)
    runs = [
        _generate(
            checkpoints["llama31"],
            [params] * len(_prompts()),
            speculative_config=NGRAM,
            num_kv_blocks=40,
        )[0]
        for _ in range(2)
    ]
    assert [o.token_ids for o in runs[0]] == [o.token_ids for o in runs[1]]


def _small_vocab_model(root: Path) -> Path:
    """A 2-layer Llama with a 12-token vocabulary: its sampled tokens are countable."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / "vocab12"
    if not (path / "config.json").is_file():
        torch.manual_seed(5)
        config = LlamaConfig(**{**tiny_models.COMMON, "vocab_size": 12, "initializer_range": 0.5})
        LlamaForCausalLM(config).float().eval().save_pretrained(str(path), safe_serialization=True)
    return path


def test_end_to_end_distribution_with_speculation_equals_without(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Two samples of 1,200 continuations of one repetitive prompt (the n-gram proposer always
    has a draft), temperature 1 and top-p 0.9: the joint distribution of the 2nd and 3rd tokens
    with speculation equals the one without (a two-sample chi-square test at 99.9%)."""
    path = _small_vocab_model(tmp_path_factory.mktemp("vocab12"))
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4, 5]
    n = 1200
    counts = []
    for spec in (
        None,
        {"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 256},
    ):
        torch.manual_seed(11)
        llm = LLM(str(path), device="cpu", show_progress=False, speculative_config=spec)
        params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=3, ignore_eos=True)
        outs = llm.generate([prompt] * n, params)
        pairs = torch.tensor([o.token_ids[1] * 12 + o.token_ids[2] for o in outs])
        counts.append(torch.bincount(pairs, minlength=144).float())
        if spec is not None:
            assert llm.engine.scheduler.num_accepted_tokens_total > n // 4
    a, b = counts
    keep = (a + b) >= 10  # cells with enough mass; the rest pooled into one
    a_cells = torch.cat([a[keep], a[~keep].sum(0, keepdim=True)])
    b_cells = torch.cat([b[keep], b[~keep].sum(0, keepdim=True)])
    total = a_cells + b_cells
    used = total > 0
    expected_a = total[used] * a.sum() / (a.sum() + b.sum())
    expected_b = total[used] * b.sum() / (a.sum() + b.sum())
    stat = float(
        ((a_cells[used] - expected_a) ** 2 / expected_a).sum()
        + ((b_cells[used] - expected_b) ** 2 / expected_b).sum()
    )
    dof = int(used.sum()) - 1
    # The chi-square 99.9% quantile, Wilson-Hilferty: accurate to ~1% at these dof.
    z = 3.0902
    bound = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert stat < bound, (stat, bound, dof)
