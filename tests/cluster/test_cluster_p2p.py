"""The cluster with KV over torch.distributed point-to-point (gloo on CPU; NCCL on GPUs)."""

from __future__ import annotations

from engine import LLM, SamplingParams
from tandem.cluster import ClusterConfig
from tests.cluster.cluster_harness import ClusterThread


def test_p2p_transport_equals_offline_engine():
    cluster = ClusterThread(
        ClusterConfig(engine_kwargs={"device": "cpu"}, calibrate=False, kv_transport="p2p")
    )
    try:
        prompts = ["Hello world", "Blocks of the cache move"]
        offline = LLM("tiny-random", device="cpu", show_progress=False).generate(
            prompts, SamplingParams(temperature=0.0, max_tokens=12)
        )
        for prompt, ref in zip(prompts, offline):
            tokens, final = [], None
            for msg in cluster.client.generate(prompt, temperature=0.0, max_tokens=12):
                tokens.extend(msg.token_ids)
                final = msg
            assert tokens == ref.token_ids and final.timings.HasField(
                "kv_transfer"
            )  # 0 when it landed first
        assert cluster.wait_all_free()
    finally:
        cluster.close()
