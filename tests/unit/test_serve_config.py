"""`tandem serve` flags -> ClusterConfig, and LocalCluster's plan (pure, no Ray): tensor
parallelism inside pool workers."""

from __future__ import annotations

import pytest

from tandem.serve import ServeError, ServeOptions, serve_config


def test_tensor_parallel_size_reaches_every_worker_on_cpu():
    config = serve_config(ServeOptions(device="cpu", tensor_parallel_size=2), num_gpus=0)
    assert config.engine_kwargs["tensor_parallel_size"] == 2 and not config.use_gpus
    assert (config.num_prefill, config.num_decode) == (1, 1)


def test_gpus_are_counted_in_tp_groups():
    config = serve_config(ServeOptions(tensor_parallel_size=2), num_gpus=8)
    assert (config.num_prefill, config.num_decode) == (2, 2)
    assert (
        serve_config(
            ServeOptions(mode="colocated", tensor_parallel_size=4), num_gpus=8
        ).num_colocated
        == 2
    )


@pytest.mark.parametrize(
    ("options", "num_gpus", "flag"),
    [
        (ServeOptions(tensor_parallel_size=4), 2, "--tensor-parallel-size"),
        (ServeOptions(tensor_parallel_size=2), 2, "--mode"),  # one group: no room for two pools
        (ServeOptions(tensor_parallel_size=2, num_prefill=2, num_decode=1), 4, "--num-decode"),
        (
            ServeOptions(mode="colocated", num_colocated=3, tensor_parallel_size=2),
            4,
            "--num-colocated",
        ),
    ],
)
def test_what_does_not_fit_names_the_flag(options, num_gpus, flag):
    with pytest.raises(ServeError) as err:
        serve_config(options, num_gpus)
    assert err.value.field == flag


def test_nccl_kv_with_tp_groups_is_planned():
    config = serve_config(ServeOptions(tensor_parallel_size=2, transport="nccl"), num_gpus=4)
    assert config.kv_transport == "p2p" and config.engine_kwargs["tensor_parallel_size"] == 2


def test_p2p_kv_group_with_a_tp_pool_holds_each_workers_rank_0():
    from tandem.cluster import ClusterConfig, LocalCluster

    cluster = LocalCluster(
        ClusterConfig(
            kv_transport="p2p", pool_engine_kwargs={"decode": {"tensor_parallel_size": 2}}
        )
    )
    cluster._plan_kv_groups(cluster._plan())
    assert sorted(cluster._kv_groups) == ["decode-0", "prefill-0"]
    assert {g.world_size for g in cluster._kv_groups.values()} == {2}  # the follower is no member
    assert cluster._kv_groups["prefill-0"].peers == (1,) and cluster._kv_groups[
        "decode-0"
    ].peers == (0,)
    assert (
        cluster._engine_kwargs("decode")["tensor_parallel_size"] == 2
        and cluster._tp_size("prefill") == 1
    )
