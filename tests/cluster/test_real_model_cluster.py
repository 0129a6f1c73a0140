"""SmolLM2-135M-Instruct through the disaggregated cluster (real Ray actors, the real gRPC
router, KV prefill -> decode over the gRPC transport) equals transformers, float32, greedy:
8 chat prompts x 64 tokens. The decode pool speculates (n-gram, k = 4), so this is also the
exactness of speculative decoding through the cluster: the decode worker proposes from the
prompt it received and the first token the prefill worker sampled. Skipped when the `demo`
extra (the model package) is missing."""

from __future__ import annotations

import pytest

from tests.real_model import skip_without_model  # noqa: E402

skip_without_model()

from tandem.cluster import ClusterConfig  # noqa: E402
from tests.cluster.cluster_harness import ClusterThread  # noqa: E402
from tests.real_model import CHAT_PROMPTS, MAX_TOKENS, hf_greedy, strip_eos  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    config = ClusterConfig(
        model="demo",
        num_prefill=1,
        num_decode=1,
        engine_kwargs={"device": "cpu", "dtype": "float32"},
        pool_engine_kwargs={
            "decode": {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}}
        },
    )
    c = ClusterThread(config)
    yield c
    c.close()


def _cluster_greedy(cluster: ClusterThread, messages: list[dict[str, str]]) -> list[int]:
    tokens: list[int] = []
    # The "batch" class: this test is about the tokens, not admission (a busy CPU can predict a
    # TPOT over the default class's 100 ms and rightly refuse).
    stream = cluster.client.generate(messages, temperature=0.0, max_tokens=MAX_TOKENS, slo="batch")
    for msg in stream:
        tokens.extend(msg.token_ids)
    return tokens


def test_cluster_greedy_equals_transformers(cluster):
    expected = hf_greedy(CHAT_PROMPTS)
    got = [_cluster_greedy(cluster, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS]
    for prompt, want, have in zip(CHAT_PROMPTS, expected, got):
        assert strip_eos(have) == strip_eos(want), prompt
    assert cluster.wait_all_free()


def test_capital_of_france(cluster):
    question = [
        {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
    ]
    text, final = cluster.client.generate_text(
        question, temperature=0.0, max_tokens=32, slo="batch"
    )
    assert "Paris" in text
    assert final.HasField("timings") and final.timings.HasField("kv_transfer")
