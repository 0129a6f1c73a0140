"""Self-healing pools: a crashed worker is restarted by Ray and re-admitted by the router.

Real Ray actors and the real gRPC router on CPU. A crash (`LocalCluster.crash_worker`: the
process dies, Ray may restart it) ends the requests on that worker UNAVAILABLE; the cluster
reports NOT_SERVING until the new process has loaded its model and heartbeats with a new
incarnation, then SERVING again without anyone restarting it, and serves as before.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from tandem.client import TandemClientError
from tandem.cluster import ClusterConfig
from tests.cluster.cluster_harness import ClusterThread

PROMPT = "Blocks of the cache move"
RECOVERY_S = 60.0


@pytest.fixture(scope="module")
def cluster():
    config = ClusterConfig(
        num_prefill=1, num_decode=1, engine_kwargs={"device": "cpu"}, calibrate=False
    )
    c = ClusterThread(config)
    yield c
    c.close()


def greedy(cluster: ClusterThread) -> list[int]:
    tokens: list[int] = []
    for msg in cluster.client.generate(PROMPT, temperature=0.0, max_tokens=12):
        tokens.extend(msg.token_ids)
    return tokens


def incarnation(cluster: ClusterThread, worker_id: str) -> str | None:
    return cluster.run(
        cluster.cluster.actors[worker_id].load.remote(), timeout=RECOVERY_S
    ).incarnation


def wait_health(cluster: ClusterThread, want: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cluster.client.health() == want:
            return True
        time.sleep(0.05)
    return False


def stream_until_crash(cluster: ClusterThread, started: threading.Event) -> list[BaseException]:
    """Start a long stream in a thread; returns the list its error lands in."""
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            for i, _ in enumerate(
                cluster.client.generate("victim", max_tokens=1500, ignore_eos=True)
            ):
                if i == 2:
                    started.set()
        except TandemClientError as exc:
            errors.append(exc)

    threading.Thread(target=stream, daemon=True).start()
    return errors


def test_a_crashed_decode_worker_comes_back_by_itself(cluster):
    before = greedy(cluster)
    old = incarnation(cluster, "decode-0")
    assert cluster.wait_all_free()
    started = threading.Event()
    errors = stream_until_crash(cluster, started)
    assert started.wait(30)
    crashed_at = time.monotonic()
    cluster.run(cluster.cluster.crash_worker("decode-0"))
    assert wait_health(cluster, "NOT_SERVING", 5)
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert errors and errors[0].code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - crashed_at < 5
    assert wait_health(cluster, "SERVING", RECOVERY_S)  # nobody restarted it but Ray
    assert incarnation(cluster, "decode-0") != old
    assert greedy(cluster) == before
    assert cluster.wait_all_free(10)


def test_a_crashed_prefill_worker_comes_back_by_itself(cluster):
    before = greedy(cluster)
    old = incarnation(cluster, "prefill-0")
    cluster.run(cluster.cluster.crash_worker("prefill-0"))
    assert wait_health(cluster, "NOT_SERVING", 5)
    assert wait_health(cluster, "SERVING", RECOVERY_S)
    assert incarnation(cluster, "prefill-0") != old
    assert greedy(cluster) == before
    assert cluster.wait_all_free(10)
