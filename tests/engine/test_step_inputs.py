"""The vectorised step inputs equal a per-token reference on random mixed steps."""

from __future__ import annotations

import random

import torch

from engine.runner.inputs import build_step_inputs
from engine.sampling_params import SamplingParams
from engine.scheduler.output import ScheduledRequest, SchedulerOutput
from engine.utils.math import cdiv


def _random_step(rng: random.Random, block_size: int) -> SchedulerOutput:
    reqs = []
    for i in range(rng.randint(1, 12)):
        start = rng.randint(0, 300)
        n = rng.choice([1, 1, rng.randint(1, 40)])
        blocks = rng.sample(range(1, 5000), cdiv(start + n, block_size))
        reqs.append(
            ScheduledRequest(
                str(i),
                [rng.randint(0, 99) for _ in range(n)],
                start,
                blocks,
                rng.random() < 0.7,
                SamplingParams(),
                [1],
                [],
            )
        )
    return SchedulerOutput(reqs, [], sum(r.num_tokens for r in reqs))


def test_positions_slots_tables_match_reference():
    rng = random.Random(0)
    for _ in range(200):
        bs = rng.choice([8, 16, 32])
        out = _random_step(rng, bs)
        got = build_step_inputs(out, bs)
        positions = [p for s in out.scheduled for p in range(s.start_position, s.seq_len)]
        slots = [
            s.block_ids[p // bs] * bs + p % bs
            for s in out.scheduled
            for p in range(s.start_position, s.seq_len)
        ]
        ends = torch.tensor([s.num_tokens for s in out.scheduled]).cumsum(0)
        assert got.positions.tolist() == positions and got.slot_mapping.tolist() == slots
        assert got.query_start_loc.tolist() == [0, *ends.tolist()]
        assert got.seq_lens.tolist() == [s.seq_len for s in out.scheduled]
        assert got.sample_indices.tolist() == [
            int(e) - 1 for e, s in zip(ends, out.scheduled) if s.sample
        ]
        for row, s in zip(got.block_tables.tolist(), out.scheduled):
            assert row[: len(s.block_ids)] == s.block_ids and not any(row[len(s.block_ids) :])
        assert got.block_tables.dtype == torch.int32 and got.slot_mapping.dtype == torch.int64


def test_packed_copy_keeps_every_tensor():
    rng = random.Random(1)
    out = _random_step(rng, 16)
    host = build_step_inputs(out, 16)
    names = (
        "input_ids",
        "positions",
        "slot_mapping",
        "query_start_loc",
        "seq_lens",
        "block_tables",
        "sample_indices",
    )
    from engine.runner.inputs import packed_to

    tensors = [getattr(host, n) for n in names] + [
        torch.empty(0, dtype=torch.int32),
        torch.tensor([7], dtype=torch.int32),
    ]
    moved = packed_to(tensors, torch.device("cpu"), pin=False)
    for a, b in zip(tensors, moved):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert b.data_ptr() % b.element_size() == 0
