"""A client that falls behind still gets every token, in order and exactly once: the flow
hands it the tokens that queued meanwhile in fewer, larger batches (router.decode_stream)."""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.flow import Orchestrator
from router.registry import Pool, WorkerRegistry
from router.request import FinishReason, GenerateRequest, OutputBatch
from router.slo import Slo
from tandem.testing.fake_worker import FakeDelays, FakeWorker

PROMPT = tuple(range(65, 65 + 20))
MAX_TOKENS = 40
CONFIG = RouterConfig(max_model_len=512, poll_wait_s=0.2, poll_grace_s=0.3)
NO_SLO = Slo(ttft_s=None, tpot_s=None, best_effort=False, priority=0)


async def _serve(read_delay_s: float, num_streams: int) -> list[list[OutputBatch]]:
    registry = WorkerRegistry(CONFIG.heartbeat_interval_s, CONFIG.heartbeat_timeout_s)
    orch = Orchestrator(registry, CONFIG)
    workers = {
        "p0": (Pool.PREFILL, FakeWorker("p0")),
        "d0": (Pool.DECODE, FakeWorker("d0", delays=FakeDelays(step_s=0.001))),
    }
    for wid, (pool, worker) in workers.items():
        await orch.add_worker(wid, pool, worker)

    async def client(i: int) -> list[OutputBatch]:
        params = SamplingParams(max_tokens=MAX_TOKENS)
        req = GenerateRequest(f"r{i}", PROMPT, params, NO_SLO, "interactive", time.monotonic())
        batches = []
        async with aclosing(orch.generate(req)) as stream:
            async for batch in stream:
                batches.append(batch)
                await asyncio.sleep(read_delay_s)  # a client slow to read
        return batches

    try:
        return await asyncio.gather(*(client(i) for i in range(num_streams)))
    finally:
        await orch.close()
        for _, worker in workers.values():
            await worker.close()


def _expected() -> list[int]:
    return [PROMPT[i % len(PROMPT)] for i in range(MAX_TOKENS)]  # the fake worker echoes


def test_a_slow_client_gets_every_token_in_order_in_fewer_batches() -> None:
    results = asyncio.run(asyncio.wait_for(_serve(0.02, 4), 20))
    for batches in results:
        tokens = [t for b in batches for t in b.token_ids]
        assert tokens == _expected()
        assert "".join(b.text_delta for b in batches) == "".join(map(chr, _expected()))
        assert len(batches) < MAX_TOKENS / 2  # tokens that queued up came together
        final = batches[-1].summary
        assert final is not None and all(b.summary is None for b in batches[:-1])
        assert final.finish_reason is FinishReason.LENGTH
        assert final.num_completion_tokens == MAX_TOKENS


def test_a_client_that_keeps_up_gets_the_same_tokens() -> None:
    results = asyncio.run(asyncio.wait_for(_serve(0.0, 2), 20))
    for batches in results:
        assert [t for b in batches for t in b.token_ids] == _expected()
