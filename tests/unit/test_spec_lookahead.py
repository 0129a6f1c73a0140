"""The speculation policy (engine.spec.lookahead): how many drafts a row gets, pure Python."""

from __future__ import annotations

from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.spec.lookahead import VERIFY_TOKENS_MAX, LookaheadPolicy


def _request(max_tokens: int | None = None, outputs: int = 1) -> Request:
    r = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens))
    r.output_token_ids.extend([5] * outputs)
    return r


def test_caps_by_budget_context_and_max_tokens() -> None:
    policy = LookaheadPolicy(max_k=6)
    assert policy.lookahead(_request(), budget_left=100, max_model_len=100) == 6
    assert policy.lookahead(_request(), budget_left=2, max_model_len=100) == 2
    assert policy.lookahead(_request(), budget_left=100, max_model_len=8) == 2  # 5 tokens held
    assert policy.lookahead(_request(max_tokens=3, outputs=1), 100, 100) == 1
    assert policy.lookahead(_request(max_tokens=2, outputs=2), 100, 100) == 0


def test_k_follows_acceptance() -> None:
    policy = LookaheadPolicy(max_k=4)
    r = _request()
    policy.after_verify(r, num_drafts=4, num_accepted=1)
    assert r.spec_k == 2
    policy.after_verify(r, num_drafts=2, num_accepted=2)
    assert r.spec_k == 3
    policy.after_verify(r, num_drafts=3, num_accepted=0)
    assert r.spec_k == 1
    policy.after_verify(r, num_drafts=0, num_accepted=0)  # no proposal: says nothing
    assert r.spec_k == 1
    assert (r.num_draft_tokens, r.num_accepted_tokens) == (9, 3)
    fixed = LookaheadPolicy(max_k=4, dynamic=False)
    policy_free = _request()
    fixed.after_verify(policy_free, 4, 0)
    assert fixed.lookahead(policy_free, 100, 100) == 4


def test_large_batches_do_not_speculate() -> None:
    policy = LookaheadPolicy(max_k=3)
    limit = VERIFY_TOKENS_MAX // 4
    assert policy.active(limit) and not policy.active(limit + 1)
    explicit = LookaheadPolicy(max_k=3, disable_above=200)
    assert explicit.active(200) and not explicit.active(201)
