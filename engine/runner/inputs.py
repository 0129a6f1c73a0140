"""Flat varlen step inputs: positions, slot mapping, block tables, sample indices.

Built on the host from a SchedulerOutput, then moved to the device in one batch of copies.
`StepInputs` is also what a TP leader broadcasts to its followers: a few tensors, not requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.attention.backend import AttentionMetadata
from engine.scheduler.output import SchedulerOutput
from engine.utils.math import cdiv


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
        """The tensors on `device`: to a GPU as one copy from one pinned buffer (see `packed_to`)."""
        if self.input_ids.device == device:
            return self
        moved = packed_to(
            [getattr(self, name) for name in _TENSORS], device, pin=device.type == "cuda"
        )
        return StepInputs(**dict(zip(_TENSORS, moved)), decode_only=self.decode_only)


_TENSORS = (
    "input_ids",
    "positions",
    "slot_mapping",
    "query_start_loc",
    "seq_lens",
    "block_tables",
    "sample_indices",
)


def packed_to(tensors: list[torch.Tensor], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """Host tensors moved to `device` as views of one buffer, copied once.

    The bytes are packed (each tensor 8-byte aligned) into one buffer, pinned when `pin`
    (PyTorch's caching host allocator: cheap after the first steps, and not reused before the
    copy ran). One copy instead of one per tensor; and from pinned memory it is truly
    asynchronous: a copy from pageable memory waits for every kernel already queued on the
    stream, e.g. a prefix's onload from the CPU tier, which the host could otherwise overlap
    with enqueueing this step's forward pass."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + cdiv(size, 8) * 8)
    buf = torch.empty(offsets[-1], dtype=torch.uint8, pin_memory=pin)
    for t, start, size in zip(tensors, offsets, sizes):
        if size:
            buf[start : start + size].copy_(t.contiguous().view(-1).view(torch.uint8))
    moved = buf.to(device, non_blocking=True)
    return [
        moved[start : start + size].view(t.dtype).view(t.shape)
        for t, start, size in zip(tensors, offsets, sizes)
    ]


def attention_metadata(
    host: StepInputs, dev: StepInputs, max_seq_len: int | None = None
) -> AttentionMetadata:
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


def _block_table_rows(out: SchedulerOutput) -> tuple[np.ndarray, np.ndarray]:
    """The block tables as one padded int64 array, and each row's length."""
    lengths = np.fromiter(
        (len(s.block_ids) for s in out.scheduled), dtype=np.int64, count=len(out.scheduled)
    )
    table = np.zeros((len(out.scheduled), int(lengths.max())), dtype=np.int64)
    for i, s in enumerate(out.scheduled):
        table[i, : len(s.block_ids)] = s.block_ids
    return table, lengths


def _positions_and_slots(
    out: SchedulerOutput, table: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each new token's position and cache slot, vectorised over the whole step."""
    counts = np.fromiter(
        (s.num_tokens for s in out.scheduled), dtype=np.int64, count=len(out.scheduled)
    )
    starts = np.fromiter(
        (s.start_position for s in out.scheduled), dtype=np.int64, count=len(out.scheduled)
    )
    rows = np.repeat(np.arange(len(counts)), counts)
    first_of_row = np.repeat(np.cumsum(counts) - counts, counts)
    positions = np.repeat(starts, counts) + (np.arange(int(counts.sum())) - first_of_row)
    slots = table[rows, positions // block_size] * block_size + positions % block_size
    return positions, slots


def _sample_indices(out: SchedulerOutput) -> list[int]:
    """The last row of each sampling request, and before it one row per draft it verifies."""
    indices: list[int] = []
    end = 0
    for s in out.scheduled:
        end += s.num_tokens
        if s.sample:
            indices.extend(range(end - 1 - s.num_draft_tokens, end))
    return indices


def verifies_as_decode(out: SchedulerOutput) -> bool:
    """A verify step of decode rows only: each request feeds its one real token and drafts."""
    return any(s.num_draft_tokens for s in out.scheduled) and all(
        s.sample and s.num_tokens == s.num_draft_tokens + 1 for s in out.scheduled
    )


def build_step_inputs(out: SchedulerOutput, block_size: int) -> StepInputs:
    """Host tensors for one step, built with array operations rather than per-token loops.

    A verify step of decode rows only (`verifies_as_decode`) becomes a decode step of one row
    per token: token j of a request is a sequence of its own whose context ends at it (its
    seq_len is its position + 1) over the request's block table. Every token's KV is stored
    before attention reads the cache, so each row sees exactly the keys causal attention would
    give it, the decode attention kernel serves the step, and the step can replay a decode CUDA
    graph. The rows read their request's context once each (k + 1 times per request): cheap
    while speculation runs, at small batches (engine.spec.lookahead)."""
    assert out.scheduled, "an empty step has no inputs"
    table, _ = _block_table_rows(out)
    positions, slots = _positions_and_slots(out, table, block_size)
    counts = np.fromiter(
        (s.num_tokens for s in out.scheduled), dtype=np.int32, count=len(out.scheduled)
    )
    input_ids = torch.tensor([t for s in out.scheduled for t in s.token_ids], dtype=torch.int64)
    sample_indices = torch.tensor(_sample_indices(out), dtype=torch.int64)
    if verifies_as_decode(out):
        rows = np.repeat(np.arange(len(counts)), counts)
        return StepInputs(
            input_ids=input_ids,
            positions=torch.from_numpy(positions),
            slot_mapping=torch.from_numpy(slots),
            query_start_loc=torch.arange(len(rows) + 1, dtype=torch.int32),
            seq_lens=torch.from_numpy((positions + 1).astype(np.int32)),
            block_tables=torch.from_numpy(table[rows].astype(np.int32)),
            sample_indices=sample_indices,
            decode_only=True,
        )
    query_start_loc = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start_loc[1:])
    return StepInputs(
        input_ids=input_ids,
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slots),
        query_start_loc=torch.from_numpy(query_start_loc),
        seq_lens=torch.tensor([s.seq_len for s in out.scheduled], dtype=torch.int32),
        block_tables=torch.from_numpy(table.astype(np.int32)),
        sample_indices=sample_indices,
        decode_only=out.decode_only,
    )
