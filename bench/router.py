"""Router overhead with zero-compute fake workers: sustained requests/s and latency added.

The router (and its in-process fake workers, all delays 0) runs in this process; load comes
from client processes over loopback gRPC, each running closed-loop streams (a new request as
soon as one finishes). Every request streams `--tokens` tokens (1 from prefill, the rest one
per decode step). Since the fakes compute nothing, everything a client measures is router
overhead (gRPC, validation, placement, worker calls, demultiplexing, streaming): added latency
= client-measured end-to-end time minus the fakes' configured compute time (0).

Phases: `latency` (1 stream) and `throughput` (`--concurrency` streams), each also run against
`floor`: a bare gRPC servicer in the same process that streams the same number of messages per
request as the router did (it does nothing else), i.e. the transport's own cost on this host.
`--http` adds the same two phases through the OpenAI-compatible HTTP front door of the same
router (`POST /v1/completions`, streamed server-sent events, one httpx client per process):
the HTTP path against the gRPC path on the same host, router and load.
Targets: >= 2,000 req/s and <= 1 ms added at p50; against the floor of the same run (issue 24),
req/s at `--concurrency` streams >= 0.8x the floor's and added p50 at 1 stream <= 1.5x the
floor's (both printed as ratios). Router and floor phases alternate in `--rounds` slices
(default 3), so that both see the same background load. Bounded: about
`4 * --seconds + 4 * --rounds + 15` s (each slice starts its client processes).
The host's load average is printed: on a shared machine every figure moves with it.

    python bench/router.py [--seconds 8] [--concurrency 64] [--clients 1] [--tokens 16] [--http]
        [--rounds 3] [--profile PATH]

`--profile PATH` runs cProfile in the router process during the router's slices only (never
the floor's) and prints its hottest functions: where the router's time goes, at the price of
slower router figures in that run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_RPS = 2000.0
TARGET_P50_MS = 1.0
TARGET_FLOOR_RPS_RATIO = 0.8  # issue 24: router req/s >= 80% of the bare servicer's
TARGET_FLOOR_P50_RATIO = 1.5  # issue 24: router added p50 <= 1.5x the bare servicer's


@dataclass(frozen=True)
class PhaseResult:
    name: str
    concurrency: int
    seconds: float
    latencies_s: list[float]
    ttfts_s: list[float]
    messages: int
    tokens: int
    errors: int


# -- client side (separate processes) -------------------------------------------------------


async def _client_loop(
    address: str, concurrency: int, seconds: float, tokens: int
) -> dict[str, object]:
    """Closed-loop streams; against the floor server, `tokens` is the number of messages."""
    import grpc

    from tandem.api import generation_pb2 as pb
    from tandem.api import generation_pb2_grpc as pb_grpc

    latencies: list[float] = []
    ttfts: list[float] = []
    counts = {"messages": 0, "tokens": 0, "errors": 0}
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(range(100, 116))),
        sampling=pb.SamplingParams(max_tokens=tokens, temperature=0.0),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                start = time.perf_counter()
                first = None
                try:
                    async for msg in stub.Generate(request):
                        first = first or time.perf_counter()
                        counts["messages"] += 1
                        counts["tokens"] += len(msg.token_ids)
                except grpc.aio.AioRpcError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                ttfts.append((first or start) - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "ttfts": ttfts, **counts}


async def _http_client_loop(
    base_url: str, concurrency: int, seconds: float, tokens: int
) -> dict[str, object]:
    """Closed-loop streamed completions over HTTP; a message is one SSE chunk with text."""
    import httpx2 as httpx

    latencies: list[float] = []
    ttfts: list[float] = []
    counts = {"messages": 0, "tokens": 0, "errors": 0}
    body = {
        "model": "fake",
        "prompt": list(range(100, 116)),
        "max_tokens": tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as client:
        end = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < end:
                start = time.perf_counter()
                first = None
                try:
                    async with client.stream("POST", "/v1/completions", json=body) as response:
                        if response.status_code != 200:
                            counts["errors"] += 1
                            continue
                        async for line in response.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[6:])
                            if chunk.get("choices"):
                                first = first or time.perf_counter()
                                counts["messages"] += 1
                            elif chunk.get("usage"):
                                counts["tokens"] += chunk["usage"]["completion_tokens"]
                except httpx.HTTPError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - start)
                ttfts.append((first or start) - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"latencies": latencies, "ttfts": ttfts, **counts}


def _client_main(
    address: str, concurrency: int, seconds: float, tokens: int, out: mp.Queue
) -> None:
    if address.startswith("http://"):
        loop = _http_client_loop(address, concurrency, seconds, tokens)
    else:
        loop = _client_loop(address, concurrency, seconds, tokens)
    out.put(json.dumps(asyncio.run(loop)))


def run_clients(
    address: str, name: str, clients: int, concurrency: int, seconds: float, tokens: int
) -> PhaseResult:
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    per_client = max(concurrency // clients, 1)
    procs = [
        ctx.Process(target=_client_main, args=(address, per_client, seconds, tokens, out))
        for _ in range(clients)
    ]
    for p in procs:
        p.start()
    parts = [json.loads(out.get(timeout=seconds + 60)) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    return PhaseResult(
        name,
        per_client * clients,
        seconds,
        [x for part in parts for x in part["latencies"]],
        [x for part in parts for x in part["ttfts"]],
        sum(p["messages"] for p in parts),
        sum(p["tokens"] for p in parts),
        sum(p["errors"] for p in parts),
    )


def merge(parts: list[PhaseResult]) -> PhaseResult:
    """Slices of one phase as one result (their seconds, samples and counts added up)."""
    return PhaseResult(
        parts[0].name,
        parts[0].concurrency,
        sum(p.seconds for p in parts),
        [x for p in parts for x in p.latencies_s],
        [x for p in parts for x in p.ttfts_s],
        sum(p.messages for p in parts),
        sum(p.tokens for p in parts),
        sum(p.errors for p in parts),
    )


def routed_and_floor(
    address: str,
    floor_address: str,
    load: tuple[str, int, int, float, int],
    rounds: int,
    profiling: Any,
) -> list[PhaseResult]:
    """The router phase and its floor, alternating in `rounds` slices of `seconds / rounds`:
    on a shared host the background load moves within a run, and both sides of the ratio
    then see the same load. Each floor slice streams as many messages per request as the
    router slice before it did. `load`: (name, clients, concurrency, seconds, tokens).
    `profiling` (an Event) is set while the router's slices run, never the floor's."""
    name, clients, concurrency, seconds, tokens = load
    routed: list[PhaseResult] = []
    floor: list[PhaseResult] = []
    for _ in range(rounds):
        profiling.set()
        part = run_clients(address, name, clients, concurrency, seconds / rounds, tokens)
        profiling.clear()
        msgs = max(round(part.messages / max(len(part.latencies_s), 1)), 1)
        routed.append(part)
        floor.append(
            run_clients(
                floor_address, f"floor-{name[:3]}", clients, concurrency, seconds / rounds, msgs
            )
        )
    return [merge(routed), merge(floor)]


# -- router side ----------------------------------------------------------------------------


def _floor_servicer() -> object:
    from tandem.api import generation_pb2 as pb
    from tandem.api import generation_pb2_grpc as pb_grpc

    class Floor(pb_grpc.GenerationServicer):  # type: ignore[misc]
        """Streams `sampling.max_tokens` one-token messages and nothing else."""

        async def Generate(self, request: pb.GenerateRequest, context: object) -> None:
            for i in range(request.sampling.max_tokens):
                await context.write(pb.GenerateResponse(request_id="floor", token_ids=[i]))  # type: ignore[attr-defined]

    return Floor()


def _router_process_main(
    ready: mp.Queue, stop: Any, num_decode: int, profiling: Any, profile_path: str | None
) -> None:
    """The router, its fake workers and the floor servicer, until `stop`. With `profile_path`,
    cProfile runs while `profiling` is set (the router's slices) and is written there."""
    profiler = cProfile.Profile() if profile_path else None

    async def main() -> None:
        import grpc

        from router.config import RouterConfig
        from router.server import RouterServer
        from router.tokenizer import ByteTokenizer
        from tandem.api import generation_pb2_grpc as pb_grpc
        from tandem.testing.fake_worker import FakeWorker

        config = RouterConfig(max_model_len=4096, model_name="fake", http_port=0)
        server = RouterServer(config, ByteTokenizer())
        await server.start()
        workers = [FakeWorker("p0")] + [FakeWorker(f"d{i}") for i in range(num_decode)]
        await server.add_worker("p0", "prefill", workers[0])
        for w in workers[1:]:
            await server.add_worker(w.worker_id, "decode", w)
        floor = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(_floor_servicer(), floor)
        floor_port = floor.add_insecure_port("127.0.0.1:0")
        await floor.start()
        http = f"http://{config.host}:{server.http_port}"
        ready.put((server.address, f"127.0.0.1:{floor_port}", http))
        enabled = False
        while not stop.is_set():
            if profiler is not None and enabled != profiling.is_set():
                enabled = not enabled
                if enabled:
                    profiler.enable()
                else:
                    profiler.disable()
            await asyncio.sleep(0.02)
        if profiler is not None and enabled:
            profiler.disable()
        await floor.stop(0.5)
        await server.stop(0.5)
        for w in workers:
            await w.close()

    asyncio.run(main())
    if profiler is not None and profile_path:
        profiler.dump_stats(profile_path)


def print_profile(path: str, limit: int = 30) -> None:
    """The router process's hottest functions during its slices (own time first)."""
    print(f"\nrouter process profile ({path}; cProfile slows it, so its figures above are low):")
    pstats.Stats(path).sort_stats("tottime").print_stats(limit)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def print_table(results: list[PhaseResult], tokens: int) -> None:
    head = (
        f"{'phase':<11}{'streams':>8}{'requests':>10}{'req/s':>9}{'tok/s':>9}{'msg/req':>8}"
        f"{'added p50':>11}{'added p99':>11}{'ttft p50':>10}{'errors':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        n = len(r.latencies_s)
        print(
            f"{r.name:<11}{r.concurrency:>8}{n:>10}{n / r.seconds:>9.0f}{r.tokens / r.seconds:>9.0f}"
            f"{(r.messages / n if n else 0):>8.1f}{_pct(r.latencies_s, 0.5) * 1e3:>9.2f}ms"
            f"{_pct(r.latencies_s, 0.99) * 1e3:>9.2f}ms{_pct(r.ttfts_s, 0.5) * 1e3:>8.2f}ms{r.errors:>8}"
        )
    routed = [r for r in results if r.name in ("latency", "throughput")]
    best = max(len(r.latencies_s) / r.seconds for r in routed)
    floor = (
        statistics.median(routed[0].latencies_s) * 1e3 if routed[0].latencies_s else float("nan")
    )
    print(f"\n{tokens} tokens per request; fake workers compute nothing, so added = end-to-end.")
    print(
        f"throughput {best:.0f} req/s (target >= {TARGET_RPS:.0f}): {'MET' if best >= TARGET_RPS else 'NOT MET'}"
    )
    print(
        f"added p50 at 1 stream {floor:.2f} ms (target <= {TARGET_P50_MS} ms): "
        f"{'MET' if floor <= TARGET_P50_MS else 'NOT MET'}"
    )
    print(
        "floor rows: a bare gRPC servicer streaming the router's messages per request (transport cost)"
    )
    _print_router_vs_floor(results)
    _print_http_vs_grpc(results)
    print(
        f"host: {os.cpu_count()} CPUs shared by router, fake workers and clients; "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def _print_router_vs_floor(results: list[PhaseResult]) -> None:
    """The router against the bare servicer of the same run (issue 24's targets): req/s at
    `--concurrency` streams as a fraction of the floor's, added p50 at 1 stream as a multiple."""
    by_name = {r.name: r for r in results}
    thr, floor_thr = by_name.get("throughput"), by_name.get("floor-thr")
    lat, floor_lat = by_name.get("latency"), by_name.get("floor-lat")
    if thr and floor_thr and thr.latencies_s and floor_thr.latencies_s:
        ratio = (len(thr.latencies_s) / thr.seconds) / (
            len(floor_thr.latencies_s) / floor_thr.seconds
        )
        print(
            f"router vs floor at {thr.concurrency} streams: req/s x{ratio:.2f} "
            f"(target >= x{TARGET_FLOOR_RPS_RATIO:.2f}): "
            f"{'MET' if ratio >= TARGET_FLOOR_RPS_RATIO else 'NOT MET'}"
        )
    if lat and floor_lat and lat.latencies_s and floor_lat.latencies_s:
        times = _pct(lat.latencies_s, 0.5) / _pct(floor_lat.latencies_s, 0.5)
        print(
            f"router vs floor at 1 stream: added p50 x{times:.2f} "
            f"(target <= x{TARGET_FLOOR_P50_RATIO:.2f}): "
            f"{'MET' if times <= TARGET_FLOOR_P50_RATIO else 'NOT MET'}"
        )


def _print_http_vs_grpc(results: list[PhaseResult]) -> None:
    """The HTTP front door against gRPC on the same router: p50 latency added and req/s."""
    by_name = {r.name: r for r in results}
    for grpc_name, http_name in (("latency", "http-lat"), ("throughput", "http-thr")):
        g, h = by_name.get(grpc_name), by_name.get(http_name)
        if g is None or h is None or not g.latencies_s or not h.latencies_s:
            continue
        added = (statistics.median(h.latencies_s) - statistics.median(g.latencies_s)) * 1e3
        ratio = (len(h.latencies_s) / h.seconds) / (len(g.latencies_s) / g.seconds)
        print(
            f"HTTP vs gRPC ({grpc_name}, {g.concurrency} streams): p50 {added:+.2f} ms, "
            f"req/s x{ratio:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description="router overhead with fake workers")
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--http", action="store_true", help="also the HTTP front door")
    parser.add_argument(
        "--rounds", type=int, default=3, help="router and floor alternate in this many slices"
    )
    parser.add_argument(
        "--profile", metavar="PATH", help="cProfile the router process's slices into PATH"
    )
    args = parser.parse_args()
    phases = 6 if args.http else 4
    assert args.rounds >= 1 and phases * args.seconds + 15 < 90, "keep the run bounded"
    ctx = mp.get_context("spawn")
    ready: mp.Queue = ctx.Queue()
    stop, profiling = ctx.Event(), ctx.Event()
    router = ctx.Process(
        target=_router_process_main,
        args=(ready, stop, args.decode_workers, profiling, args.profile),
    )
    router.start()
    try:
        address, floor_address, http_address = ready.get(timeout=30)
        run_clients(address, "warmup", 1, 4, 1.0, args.tokens)
        results: list[PhaseResult] = []
        for name, clients, concurrency in (
            ("latency", 1, 1),
            ("throughput", args.clients, args.concurrency),
        ):
            load = (name, clients, concurrency, args.seconds, args.tokens)
            results += routed_and_floor(address, floor_address, load, args.rounds, profiling)
            if args.http:
                results.append(
                    run_clients(
                        http_address,
                        f"http-{name[:3]}",
                        clients,
                        concurrency,
                        args.seconds,
                        args.tokens,
                    )
                )
    finally:
        stop.set()
        router.join(timeout=10)
        if router.is_alive():
            router.terminate()
    print_table(results, args.tokens)
    if args.profile:
        print_profile(args.profile)


if __name__ == "__main__":
    main()
