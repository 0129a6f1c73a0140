"""One cluster's sweep: for each workload and each rate, open-loop Poisson arrivals, measured.

Per rate (`run_rate`): the workload's requests get arrival times from bench/serve.py's
`poisson_arrivals` with a `random.Random(seed)` made afresh, so every rate replays the same
exponential draws scaled by 1/rate, and every request is measured by bench/serve.py's `one`
(token ids in, `max_tokens` out with ignore_eos, best_effort so the router measures rather than
sheds). Bounds: arrivals at or after `time_limit_s` are not sent (the record counts only what was
sent); what is still running `drain_s` after the last send is cancelled (which aborts it in the
cluster) and counts as unfinished, meeting no target. Between rates the sweep waits until the
cluster reports nothing running or waiting, so one rate's backlog does not bleed into the next.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench.goodput_metrics import RateRecord, RequestRecord, Slo, summarize_rate
from bench.goodput_workloads import Workload, WorkloadRequest
from bench.serve import one, poisson_arrivals
from tandem.client import AsyncClient, TandemClientError

UNFINISHED = "unfinished at the time limit"
IDLE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class SweepBounds:
    """Per rate: send arrivals before `time_limit_s`; cancel what runs `drain_s` after that."""

    seed: int
    time_limit_s: float
    drain_s: float


async def measure(client: AsyncClient, req: WorkloadRequest, arrival_s: float) -> RequestRecord:
    """Send `req` at `arrival_s` (from now) and time it; a failed call becomes an error record."""
    prompt = list(req.prompt_ids)
    try:
        r = await one(client, prompt, req.max_tokens, arrival_s)
    except TandemClientError as exc:
        return RequestRecord(arrival_s, len(prompt), 0, None, None, error=str(exc))
    return RequestRecord(arrival_s, len(prompt), r["tokens"], r["ttft"], r["end"] - r["start"])


def _unfinished(req: WorkloadRequest, arrival_s: float) -> RequestRecord:
    return RequestRecord(arrival_s, len(req.prompt_ids), 0, None, None, error=UNFINISHED)


async def run_rate(
    client: AsyncClient, workload: Workload, rate: float, slo: Slo, bounds: SweepBounds
) -> RateRecord:
    arrivals = poisson_arrivals(len(workload.requests), rate, random.Random(bounds.seed))
    planned = [(a, r) for a, r in zip(arrivals, workload.requests) if a < bounds.time_limit_s]
    start = time.perf_counter()
    tasks = [asyncio.create_task(measure(client, r, a)) for a, r in planned]
    last_send = planned[-1][0] if planned else 0.0
    if tasks:
        await asyncio.wait(tasks, timeout=last_send + bounds.drain_s)
    records = []
    for task, (arrival, req) in zip(tasks, planned):
        if task.done():
            records.append(task.result())
        else:
            task.cancel()
            records.append(_unfinished(req, arrival))
    await asyncio.gather(*tasks, return_exceptions=True)
    return summarize_rate(rate, records, slo, time.perf_counter() - start)


async def wait_idle(client: AsyncClient, timeout_s: float = IDLE_TIMEOUT_S) -> bool:
    """True once every worker reports no running and no waiting request (polled, bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await client.cluster_status()
        if all(w.load.running == 0 and w.load.waiting == 0 for w in status.workers):
            return True
        await asyncio.sleep(0.1)
    return False


async def warm_up(client: AsyncClient, vocab_size: int) -> None:
    """One short request first, so the first measured one pays no connection or warm-up cost."""
    low = min(1000, vocab_size // 4)
    await one(client, [low] * 16, 4, 0.0)


async def sweep_workload(
    client: AsyncClient,
    workload: Workload,
    rates: list[float],
    slo: Slo,
    bounds: SweepBounds,
    advance: Callable[[], None],
) -> list[RateRecord]:
    """Every rate of `rates` in order; `advance()` after each (the progress bar)."""
    records = []
    for rate in rates:
        records.append(await run_rate(client, workload, rate, slo, bounds))
        await wait_idle(client)
        advance()
    return records
