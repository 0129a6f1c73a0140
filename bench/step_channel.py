"""How long the TP leader's step message takes to reach a follower: shared memory vs gloo.

    python bench/step_channel.py [--steps 2000] [--batch 64] [--width 128]

Two processes on this host (CPU-side work: valid on any machine). The leader publishes decode
step inputs of `--batch` requests with `--width`-block tables, `--steps` times (StepChannel, as
the engine does); the follower receives each and acks it through a one-word shared-memory
reply, so one iteration is the one-way latency a TP step waits for before the follower can
launch its forward (packing, the diff, the hand-over, unpacking), plus a reply through raw
shared memory (a bare shared-memory ping-pong is printed for scale). Run for the
shared-memory ring and for gloo broadcasts (the fallback, and what every step paid before).
Median and p99 per round trip; writes $OUT/step_channel.json when OUT is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.distributed.parallel_state import TPGroup  # noqa: E402
from engine.executor.shm_channel import ShmBroadcast  # noqa: E402
from engine.executor.step_channel import StepChannel  # noqa: E402
from engine.runner.inputs import StepInputs  # noqa: E402


def _inputs(batch: int, width: int, step: int) -> StepInputs:
    ctx = torch.arange(batch, dtype=torch.int64) * 7 + 100 + step
    return StepInputs(
        input_ids=(ctx * 31) % 5000,
        positions=ctx - 1,
        slot_mapping=ctx * 3,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=ctx.to(torch.int32),
        block_tables=torch.arange(batch * width, dtype=torch.int32).reshape(batch, width) + 1,
        sample_indices=torch.arange(batch, dtype=torch.int64),
        decode_only=True,
    )


def _worker(
    rank: int, port: int, transport: str, steps: int, batch: int, width: int, out: str
) -> None:
    store = dist.TCPStore(
        "127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=60)
    )
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    tp = TPGroup(
        rank=rank, size=2, group=dist.group.WORLD, cpu_group=dist.new_group([0, 1], backend="gloo")
    )
    forward = StepChannel(tp, 30.0, shared_memory=transport == "shm")
    if rank == 1:  # the reply: follower writes, leader reads
        reply = ShmBroadcast.create(1, 64)
        store.set("reply", reply.path)
    else:
        reply = ShmBroadcast.attach(store.get("reply").decode(), 1, 0)
    ack = np.zeros(1, dtype=np.int64)
    times = []
    for step in range(steps + 1):
        if rank == 0:
            inputs = _inputs(batch, width, step)
            start = time.perf_counter()
            forward.publish(inputs, step)
            reply.recv_into(ack)
            times.append(time.perf_counter() - start)
        else:
            message = forward.receive()
            assert message.inputs is not None and message.step == step
            ack[0] = step
            reply.send(ack, 30.0)
    if rank == 1:
        reply.unlink()
    dist.barrier()
    if rank == 0:
        times = times[1:]  # the first message sets the channel up
        with open(out, "w") as f:
            json.dump(
                {
                    "transport": forward.transport,
                    "diff_steps": forward.num_diff_steps,
                    "median_us": statistics.median(times) * 1e6,
                    "p99_us": sorted(times)[int(0.99 * len(times))] * 1e6,
                },
                f,
            )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=128)
    args = parser.parse_args()
    results = []
    for i, transport in enumerate(("shm", "gloo")):
        out = f"/tmp/step_channel_{os.getpid()}_{transport}.json"
        mp.spawn(
            _worker, args=(29810 + i, transport, args.steps, args.batch, args.width, out), nprocs=2
        )
        with open(out) as f:
            results.append(json.load(f))
        os.unlink(out)
    print(
        f"decode step inputs, batch {args.batch}, block-table width {args.width}; "
        f"{args.steps} round trips; host: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'transport':>10s} {'publish -> received -> acked p50':>33s} {'p99':>10s} {'diff steps':>11s}"
    )
    for r in results:
        print(
            f"{r['transport']:>10s} {r['median_us']:31.1f}us {r['p99_us']:8.1f}us {r['diff_steps']:>11d}"
        )
    print(f"gloo / shm: {results[1]['median_us'] / results[0]['median_us']:.1f}x")
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "step_channel.json"), "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
