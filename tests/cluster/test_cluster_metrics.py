"""A colocated cluster's metrics: every process serves its registry on loopback, the file-SD
list and GetClusterStatus name the same targets, and stage timings add up to end to end."""

from __future__ import annotations

import json
import urllib.request

import pytest

from router.metrics import STAGES
from tandem.cluster import ClusterConfig
from tests.cluster.cluster_harness import ClusterThread


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    sd = tmp_path_factory.mktemp("sd") / "targets.json"
    c = ClusterThread(
        ClusterConfig(mode="colocated", engine_kwargs={"device": "cpu"}, metrics_sd_path=str(sd))
    )
    yield c
    c.close()


def _scrape(target: str) -> str:
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_targets_in_status_and_file_sd(cluster: ClusterThread) -> None:
    listed = list(cluster.client.cluster_status().metrics_targets)
    groups = json.loads(open(cluster.cluster.sd_path).read())
    roles = {g["labels"]["tandem_role"]: g["targets"] for g in groups}
    assert sorted(t for ts in roles.values() for t in ts) == sorted(listed) and len(listed) == 2
    assert set(roles) == {"router", "colocated"} and all(
        g["labels"]["job"] == "tandem" for g in groups
    )
    assert all(t.startswith("127.0.0.1:") for t in listed)
    assert (
        'tandem_engine_healthy{model="tiny-random",pool="colocated",worker="colocated-0"} 1.0'
        in _scrape(roles["colocated"][0])
    )


def test_colocated_stages_add_up_and_reach_the_router_metrics(cluster: ClusterThread) -> None:
    for i in range(3):
        _, final = cluster.client.generate_text(
            f"colocated {i}", max_tokens=12, ignore_eos=True, best_effort=True
        )
        t = final.timings
        assert not t.HasField("kv_transfer") and t.prefill > 0 and t.decode > 0
        total = sum(getattr(t, s) for s in STAGES if t.HasField(s))
        assert abs(total - t.end_to_end) <= 0.05 * t.end_to_end, t
    router = _scrape(cluster.cluster.metrics_targets["router"])
    assert (
        'tandem_requests_finished_total{finish_reason="length",model="tiny-random"} 3.0' in router
    )
    assert 'tandem_stage_seconds_count{model="tiny-random",stage="decode"} 3.0' in router
    assert 'tandem_stage_seconds_count{model="tiny-random",stage="kv_transfer"} 0.0' in router
