"""Step inputs travel as the changes to the previous step's payload when that is smaller."""

from __future__ import annotations

import torch

from engine.executor.step_channel import _apply_diff, _diff, pack, unpack
from engine.runner.inputs import StepInputs


def _decode_step(batch: int, width: int, step: int) -> StepInputs:
    ctx = torch.arange(batch, dtype=torch.int64) * 7 + 100 + step
    tables = torch.arange(batch * width, dtype=torch.int32).reshape(batch, width) + 1
    return StepInputs(
        input_ids=(ctx * 31) % 5000,
        positions=ctx - 1,
        slot_mapping=ctx * 3,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=ctx.to(torch.int32),
        block_tables=tables,
        sample_indices=torch.arange(batch, dtype=torch.int64),
        decode_only=True,
    )


def _same(a: StepInputs, b: StepInputs) -> bool:
    return all(
        torch.equal(getattr(a, f).to(torch.int64), getattr(b, f).to(torch.int64))
        for f in (
            "input_ids",
            "positions",
            "slot_mapping",
            "query_start_loc",
            "seq_lens",
            "block_tables",
            "sample_indices",
        )
    )


def test_consecutive_decode_steps_go_as_small_diffs_and_rebuild_exactly():
    header0, first = pack(_decode_step(64, 32, 0), 0)
    header1, second = pack(_decode_step(64, 32, 1), 1)
    diff = _diff(first, second)
    assert diff is not None and diff.numel() < second.numel() // 4  # block tables were not resent
    rebuilt = _apply_diff(first, diff)
    assert torch.equal(rebuilt, second)
    assert _same(unpack(header1.tolist(), rebuilt), _decode_step(64, 32, 1))


def test_a_payload_of_another_size_or_mostly_changed_goes_whole():
    _, a = pack(_decode_step(8, 4, 0), 0)
    _, b = pack(_decode_step(9, 4, 0), 0)
    assert _diff(None, a) is None and _diff(a, b) is None
    assert _diff(a, a + 1) is None
