"""The leader's per-step message to its followers: a StepInputs, or the order to stop.

Wire format (gloo broadcasts over the TP group's CPU group, rank 0 the source):
    header  int64[8]: kind, num_tokens T, num_seqs B, block table width W, num_sampled S,
                      decode_only, step number, payload length
    payload int64[3T + (B + 1) + B + B*W + S]: input_ids | positions | slot_mapping |
                      query_start_loc | seq_lens | block_tables (row-major) | sample_indices
Two collectives per step whatever the batch: never one per layer, request or token. The tensors
are the runner's flat step inputs (block ids and counts), not requests.

Hazard: followers wait on `receive()` for as long as the leader is idle (the CPU group's timeout
is long on purpose); the leader bounds its own `publish()` with `timeout_s`, so a follower that
hangs instead of receiving fails the leader's step rather than stalling it.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch
import torch.distributed as dist

from engine.distributed.parallel_state import TPGroup, wait_bounded
from engine.runner.inputs import StepInputs

HEADER_LEN = 8


class MessageKind(enum.IntEnum):
    STEP = 1
    SHUTDOWN = 2


class StepMessage(NamedTuple):
    kind: MessageKind
    step: int
    inputs: StepInputs | None  # None for SHUTDOWN


def pack(inputs: StepInputs, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) int64 CPU tensors for one step."""
    parts = [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.query_start_loc,
             inputs.seq_lens, inputs.block_tables.reshape(-1), inputs.sample_indices]
    payload = torch.cat([p.to("cpu", torch.int64) for p in parts])
    b, w = inputs.block_tables.shape
    header = torch.tensor([MessageKind.STEP, inputs.num_tokens, b, w, inputs.sample_indices.numel(),
                           int(inputs.decode_only), step, payload.numel()], dtype=torch.int64)
    return header, payload


def unpack(header: list[int], payload: torch.Tensor) -> StepInputs:
    _, t, b, w, s, decode_only, _, _ = header
    sizes = [t, t, t, b + 1, b, b * w, s]
    ids, pos, slots, qsl, lens, tables, samples = payload.split(sizes)
    return StepInputs(
        input_ids=ids.clone(), positions=pos.clone(), slot_mapping=slots.clone(),
        query_start_loc=qsl.to(torch.int32), seq_lens=lens.to(torch.int32),
        block_tables=tables.reshape(b, w).to(torch.int32), sample_indices=samples.clone(),
        decode_only=bool(decode_only),
    )


class StepChannel:
    """Rank 0 publishes; every other rank receives, in the same order."""

    def __init__(self, tp: TPGroup, timeout_s: float) -> None:
        assert tp.size > 1 and tp.cpu_group is not None
        self.tp = tp
        self.timeout_s = timeout_s

    def _broadcast(self, t: torch.Tensor) -> None:
        work = dist.broadcast(t, src=0, group=self.tp.cpu_group, async_op=True)
        wait_bounded(work, self.timeout_s if self.tp.is_leader else None)

    def publish(self, inputs: StepInputs, step: int) -> None:
        """Leader only. Raises RuntimeError if a follower does not take it within `timeout_s`."""
        header, payload = pack(inputs, step)
        self._broadcast(header)
        self._broadcast(payload)

    def publish_shutdown(self) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = MessageKind.SHUTDOWN
        self._broadcast(header)

    def receive(self) -> StepMessage:
        """Follower only: blocks until the leader publishes."""
        header_t = torch.empty(HEADER_LEN, dtype=torch.int64)
        self._broadcast(header_t)
        header = header_t.tolist()
        kind = MessageKind(header[0])
        if kind is MessageKind.SHUTDOWN:
            return StepMessage(kind, header[6], None)
        payload = torch.empty(header[7], dtype=torch.int64)
        self._broadcast(payload)
        return StepMessage(kind, header[6], unpack(header, payload))
