"""A LocalCluster whose prefill worker is a tensor_parallel_size 2 group (rank 0 the actor, rank
1 a follower in its placement group) and whose decode worker is TP = 1: KV leaves the prefill
group through its whole-group view, over the real gRPC transport and over the torch.distributed
p2p transport (gloo here; the KV group is a standalone process group beside the worker's TP
group), and greedy tokens equal the offline TP = 1 engine's. (TP 1 -> 2 runs in
tests/cluster/test_multinode.py.)"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tandem.cluster import ClusterConfig
from tests.cluster.cluster_harness import ClusterThread

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy dog, " * 6]  # 1 block; several
NUM_NEW = 12


@pytest.fixture(scope="module", params=["grpc", "p2p"])
def cluster(request):
    c = ClusterThread(
        ClusterConfig(
            num_prefill=1,
            num_decode=1,
            engine_kwargs={"device": "cpu"},
            pool_engine_kwargs={"prefill": {"tensor_parallel_size": 2}},
            kv_transport=request.param,
        )
    )
    yield c
    c.close()


def test_greedy_equals_offline_engine(cluster):
    offline = LLM("tiny-random", device="cpu", show_progress=False).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True)
    )
    for prompt, ref in zip(PROMPTS, offline):
        tokens, final = [], None
        for final in cluster.client.generate(
            prompt, temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True
        ):
            tokens.extend(final.token_ids)
        assert tokens == ref.token_ids
        assert final is not None and final.timings.HasField("kv_transfer")
    assert len(offline[1].prompt_token_ids) > 32  # its KV spans several blocks
    assert cluster.wait_all_free()


def test_prefill_group_shares_one_node_and_placement_group(cluster):
    import ray

    prefill = cluster.cluster.actors["prefill-0"]
    nodes = cluster.run(prefill.rank_node_ids.remote())
    assert len(nodes) == 2 and len(set(nodes)) == 1
    assert cluster.run(cluster.cluster.actors["decode-0"].rank_node_ids.remote()) == nodes[:1]
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert [len(g["bundles"]) for g in groups] == [2]  # the cluster's; the executor made none
