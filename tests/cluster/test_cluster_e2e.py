"""The disaggregated cluster end to end: real Ray actors, the real gRPC router, the demo model
on CPU, KV moving prefill -> decode over the gRPC transport."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from engine import LLM, SamplingParams
from tandem.client import AsyncClient, Slo, TandemClientError
from tandem.cluster import ClusterConfig
from tests.cluster.cluster_harness import ClusterThread

PROMPTS = ["Hello world", "The quick brown fox", "def main():", "Blocks of the cache move"]


@pytest.fixture(scope="module")
def cluster():
    c = ClusterThread(ClusterConfig(num_prefill=1, num_decode=2, engine_kwargs={"device": "cpu"}))
    yield c
    c.close()


def test_greedy_equals_offline_engine(cluster):
    llm = LLM("tiny-random", device="cpu", show_progress=False)
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16))
    for prompt, ref in zip(PROMPTS, offline):
        tokens, final = [], None
        for msg in cluster.client.generate(prompt, temperature=0.0, max_tokens=16):
            tokens.extend(msg.token_ids)
            final = msg
        assert tokens == ref.token_ids
        assert final.completion_tokens == 16 and final.prompt_tokens == len(ref.prompt_token_ids)
        t = final.timings
        stages = (
            t.router_queue + t.prefill_queue + t.prefill + t.kv_transfer + t.decode_queue + t.decode
        )
        assert t.HasField("kv_transfer") and t.prefill > 0 and stages <= t.end_to_end * 1.05
    assert cluster.wait_all_free()


def test_64_concurrent_streams_complete(cluster):
    async def one(client: AsyncClient, i: int) -> int:
        n = 0
        async for msg in client.generate(
            f"stream {i}", temperature=0.8, seed=i, max_tokens=12, ignore_eos=True
        ):
            n += len(msg.token_ids)
        return n

    async def run_all() -> list[int]:
        client = AsyncClient(cluster.address)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(64)))
        finally:
            await client.close()

    assert asyncio.run(run_all()) == [12] * 64
    assert cluster.wait_all_free()


def test_cancel_mid_stream_frees_every_block(cluster):
    stream = cluster.client.generate("cancel me", max_tokens=400, ignore_eos=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # cancels the call: the router aborts on both pools
    assert cluster.wait_all_free(10)


def test_deadline_mid_decode(cluster):
    with pytest.raises(TandemClientError) as err:
        for _ in cluster.client.generate("slow", max_tokens=400, ignore_eos=True, timeout=0.8):
            pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cluster.wait_all_free(10)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"logprobs": 1000}, "logprobs"),
        ({"stop": ["x" * 2**20]}, "stop"),
    ],
)
def test_bad_input_is_invalid_argument(cluster, kwargs, field):
    with pytest.raises(TandemClientError) as err:
        list(cluster.client.generate("hi", **kwargs))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details
    assert cluster.all_blocks_free() and cluster.client.health() == "SERVING"


def test_token_ids_outside_vocab(cluster):
    with pytest.raises(TandemClientError) as err:
        list(cluster.client.generate([5, 10**7]))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "token" in err.value.details


def test_infeasible_slo_rejected_before_prefill(cluster):
    prefill = cluster.cluster.actors["prefill-0"]
    steps_before = cluster.run(prefill.counters.remote())["engine_steps"]
    with pytest.raises(TandemClientError) as err:
        list(cluster.client.generate("x " * 200, slo=Slo(ttft_ms=0.001)))
    assert (
        err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "ttft" in err.value.details.lower()
    )
    assert cluster.run(prefill.counters.remote())["engine_steps"] == steps_before


def test_decode_worker_reports_its_cpu_swap_tier(cluster):
    import urllib.request

    address = cluster.run(cluster.cluster.actors["decode-0"].metrics_address.remote())
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    assert 'tier="cpu"' in text and 'tier="hbm"' in text


def test_killing_a_decode_worker_mid_stream(cluster):
    """UNAVAILABLE within 5 s, the prefill pool's blocks freed, later requests served."""
    errors: list[TandemClientError] = []
    started = threading.Event()

    def stream() -> None:
        try:
            for i, _ in enumerate(
                cluster.client.generate("victim", max_tokens=1500, ignore_eos=True)
            ):
                if i == 2:
                    started.set()
        except TandemClientError as exc:
            errors.append(exc)

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(30)
    busy: list[str] = []
    for _ in range(50):  # load snapshots are heartbeats: wait for the next one
        busy = [
            w.worker_id
            for w in cluster.client.cluster_status().workers
            if w.pool == "decode" and w.load.running
        ]
        if busy:
            break
        time.sleep(0.05)
    assert len(busy) == 1
    killed_at = time.monotonic()
    cluster.run(cluster.cluster.kill_worker(busy[0]))
    thread.join(10)
    assert errors and errors[0].code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - killed_at < 5
    assert cluster.wait_all_free(10)  # the prefill worker's lease is gone too
    text, final = cluster.client.generate_text("after", max_tokens=8, temperature=0.0)
    assert final.completion_tokens == 8
    assert cluster.client.health() == "SERVING"
