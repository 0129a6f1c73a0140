"""Flat varlen step inputs: positions, slot mapping, block tables, sample indices.

Built on the host from a SchedulerOutput, then moved to the device in one batch of copies.
`StepInputs` is also what a TP leader broadcasts to its followers: a few tensors, not requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.backend import AttentionMetadata
from engine.scheduler.output import SchedulerOutput


@dataclass(frozen=True)
class StepInputs:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    sample_indices: torch.Tensor  # [S] int64: rows whose hidden state is sampled
    decode_only: bool

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> StepInputs:
        if self.input_ids.device == device:
            return self
        moved = {
            name: getattr(self, name).to(device, non_blocking=True)
            for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens",
                         "block_tables", "sample_indices")
        }
        return StepInputs(**moved, decode_only=self.decode_only)


def attention_metadata(host: StepInputs, dev: StepInputs, max_seq_len: int | None = None) -> AttentionMetadata:
    """Metadata over the device tensors, with the host copies the reference path reads.

    `max_seq_len` may be an upper bound (CUDA graphs pass max_model_len)."""
    qsl = tuple(host.query_start_loc.tolist())
    lens = tuple(host.seq_lens.tolist())
    return AttentionMetadata(
        slot_mapping=dev.slot_mapping,
        query_start_loc=dev.query_start_loc,
        seq_lens=dev.seq_lens,
        block_tables=dev.block_tables,
        max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
        max_seq_len=max_seq_len if max_seq_len is not None else max(lens),
        decode_only=host.decode_only,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
    )


def _positions(out: SchedulerOutput) -> list[int]:
    positions: list[int] = []
    for s in out.scheduled:
        positions.extend(range(s.start_position, s.seq_len))
    return positions


def _slot_mapping(out: SchedulerOutput, block_size: int) -> list[int]:
    slots: list[int] = []
    for s in out.scheduled:
        for pos in range(s.start_position, s.seq_len):
            slots.append(s.block_ids[pos // block_size] * block_size + pos % block_size)
    return slots


def _block_tables(out: SchedulerOutput) -> torch.Tensor:
    width = max(len(s.block_ids) for s in out.scheduled)
    table = torch.zeros(len(out.scheduled), width, dtype=torch.int32)
    for i, s in enumerate(out.scheduled):
        table[i, : len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
    return table


def _sample_indices(out: SchedulerOutput) -> list[int]:
    indices, end = [], 0
    for s in out.scheduled:
        end += s.num_tokens
        if s.sample:
            indices.append(end - 1)
    return indices


def build_step_inputs(out: SchedulerOutput, block_size: int) -> StepInputs:
    """Host tensors for one step (pinned when CUDA is present, for async copies)."""
    assert out.scheduled, "an empty step has no inputs"
    input_ids = [t for s in out.scheduled for t in s.token_ids]
    query_start_loc = [0]
    for s in out.scheduled:
        query_start_loc.append(query_start_loc[-1] + s.num_tokens)
    return StepInputs(
        input_ids=torch.tensor(input_ids, dtype=torch.int64),
        positions=torch.tensor(_positions(out), dtype=torch.int64),
        slot_mapping=torch.tensor(_slot_mapping(out, block_size), dtype=torch.int64),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32),
        seq_lens=torch.tensor([s.seq_len for s in out.scheduled], dtype=torch.int32),
        block_tables=_block_tables(out),
        sample_indices=torch.tensor(_sample_indices(out), dtype=torch.int64),
        decode_only=out.decode_only,
    )
