"""The leader's messages to its followers: a step's StepInputs, a KV op, or the order to stop.

Transport: on one x86-64 host (every TP group: its ranks are packed on one node) messages go
through a shared-memory broadcast (engine.executor.shm_channel) that the first message sets
up with one gloo handshake; otherwise (or if the mapping fails on any rank) each message is a
gloo broadcast over the TP group's CPU group, rank 0 the source.

Wire format:
    header  int64[8]: kind, num_tokens T, num_seqs B, block table width W, num_sampled S,
                      decode_only, step number, payload length
    payload int64[3T + (B + 1) + B + B*W + S]: input_ids | positions | slot_mapping |
                      query_start_loc | seq_lens | block_tables (row-major) | sample_indices
    STEP_DIFF (most decode steps): the same header with kind STEP_DIFF and payload length 2n;
            payload int64[2n]: n positions of the step payload that changed since the previous
            step's, then their n new values (block tables and the other rows that did not
            change are not sent again). Used when the payload's length is unchanged and the diff
            is the smaller message; both sides keep the previous step's payload.
    KV ops  header: KV_READ | KV_WRITE, num_blocks n, h0, h1, l0, l1, op sequence number, n;
            payload int64[n]: block ids (the KV bytes move on the model group: kv_ops)
One message per step whatever the batch (shared memory; two broadcasts over gloo): never one
per layer, request or token. The tensors
are the runner's flat step inputs (block ids and counts), not requests.

Decoding is checked: a header whose kind, counts or payload length disagree, or a diff whose
positions fall outside the previous payload, raises StepMessageError (a ValueError naming the
field), never an IndexError or a torch error from deep inside a split.

Hazard: followers wait on `receive()` for as long as the leader is idle (the CPU group's timeout
is long on purpose); the leader bounds its own `publish()` with `timeout_s`, so a follower that
hangs instead of receiving fails the leader's step rather than stalling it.
"""

from __future__ import annotations

import enum
import logging
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from engine.distributed.parallel_state import TPGroup, wait_bounded
from engine.executor import shm_channel
from engine.executor.kv_ops import KVOp
from engine.runner.inputs import StepInputs

log = logging.getLogger(__name__)

HEADER_LEN = 8
SHM_DATA_BYTES = 8 << 20  # one part of a message; larger messages go in several parts
PATH_BYTES = 512


class MessageKind(enum.IntEnum):
    STEP = 1
    SHUTDOWN = 2
    KV_READ = 3  # a whole-group KV block read (engine.executor.kv_ops)
    KV_WRITE = 4
    STEP_DIFF = 5  # a step sent as the changes to the previous step's payload


class StepMessageError(ValueError):
    """A step-channel message that does not decode (a leader bug or corrupt shared memory);
    `field` names the header word or payload part at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class StepMessage(NamedTuple):
    kind: MessageKind
    step: int  # the step number, or the KV op's sequence number
    inputs: StepInputs | None  # None for SHUTDOWN and KV ops
    kv: KVOp | None = None  # the KV op of KV_READ / KV_WRITE


def pack(inputs: StepInputs, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) int64 CPU tensors for one step (built in numpy: a step's host path is
    latency the followers wait for, and numpy's small-array calls cost a fraction of torch's)."""
    parts = [
        inputs.input_ids,
        inputs.positions,
        inputs.slot_mapping,
        inputs.query_start_loc,
        inputs.seq_lens,
        inputs.block_tables.reshape(-1),
        inputs.sample_indices,
    ]
    payload = np.concatenate([p.cpu().numpy() for p in parts], dtype=np.int64)
    b, w = inputs.block_tables.shape
    header = np.array(
        [
            MessageKind.STEP,
            inputs.num_tokens,
            b,
            w,
            inputs.sample_indices.numel(),
            int(inputs.decode_only),
            step,
            payload.size,
        ],
        dtype=np.int64,
    )
    return torch.from_numpy(header), torch.from_numpy(payload)


def unpack(header: list[int], payload: torch.Tensor) -> StepInputs:
    """The StepInputs of a step payload. The int64 fields are views of `payload`, which nobody
    writes after it arrived (a later diff applies to a copy). Raises StepMessageError when the
    header's counts do not describe the payload."""
    _, t, b, w, s, decode_only, _, _ = _checked_header(header)
    for name, count in (("num_tokens", t), ("num_seqs", b), ("width", w), ("num_sampled", s)):
        _check(count >= 0, name, f"{count} < 0")
    expected = 3 * t + (b + 1) + b + b * w + s
    _check(payload.numel() == expected, "payload", f"{payload.numel()} words != {expected}")
    ids, pos, slots, qsl, lens, tables, samples = payload.split([t, t, t, b + 1, b, b * w, s])
    return StepInputs(
        input_ids=ids,
        positions=pos,
        slot_mapping=slots,
        query_start_loc=qsl.to(torch.int32),
        seq_lens=lens.to(torch.int32),
        block_tables=tables.view(b, w).to(torch.int32),
        sample_indices=samples,
        decode_only=bool(decode_only),
    )


def pack_kv(op: KVOp, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(header, payload) of a KV op: header kind, n, h0, h1, l0, l1, seq, n; payload the n block ids."""
    kind = MessageKind.KV_WRITE if op.write else MessageKind.KV_READ
    n = len(op.block_ids)
    header = torch.tensor([kind, n, *op.heads, *op.layers, seq, n], dtype=torch.int64)
    return header, torch.tensor(op.block_ids, dtype=torch.int64)


def unpack_kv(header: list[int], payload: torch.Tensor) -> KVOp:
    """The KV op of (header, payload); StepMessageError when the counts or ranges are wrong."""
    kind, n, h0, h1, l0, l1, _, _ = _checked_header(header)
    _check(n >= 1 and payload.numel() == n, "num_blocks", f"{n} for {payload.numel()} ids")
    _check(0 <= h0 <= h1, "heads", f"[{h0}, {h1}) is not a range")
    _check(0 <= l0 <= l1, "layers", f"[{l0}, {l1}) is not a range")
    return KVOp(kind == MessageKind.KV_WRITE, tuple(payload.tolist()), (h0, h1), (l0, l1))


class StepChannel:
    """Rank 0 publishes; every other rank receives, in the same order."""

    def __init__(self, tp: TPGroup, timeout_s: float, shared_memory: bool | None = None) -> None:
        assert tp.size > 1 and tp.cpu_group is not None
        self.tp = tp
        self.timeout_s = timeout_s
        self._want_shm = shm_channel.supported() if shared_memory is None else shared_memory
        self._connected = False
        self._shm: shm_channel.ShmBroadcast | None = None
        self._last_payload: torch.Tensor | None = None  # the previous step's, on every rank
        self.num_diff_steps = 0  # steps sent (leader) or received (followers) as a diff

    @property
    def transport(self) -> str:
        """ "shm" or "gloo" once the first message went through; "unconnected" before."""
        if not self._connected:
            return "unconnected"
        return "shm" if self._shm is not None else "gloo"

    def _gloo_broadcast(self, t: torch.Tensor) -> None:
        work = dist.broadcast(t, src=0, group=self.tp.cpu_group, async_op=True)
        wait_bounded(work, self.timeout_s if self.tp.is_leader else None)

    def _connect(self) -> None:
        """First message, every rank: agree on shared memory (all ranks mapped it) or gloo."""
        self._connected = True
        if not self._want_shm:
            return
        shm: shm_channel.ShmBroadcast | None = None
        path = torch.zeros(PATH_BYTES, dtype=torch.uint8)
        if self.tp.is_leader:
            try:
                shm = shm_channel.ShmBroadcast.create(self.tp.size - 1, SHM_DATA_BYTES)
                encoded = shm.path.encode()
                path[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
            except OSError as err:
                log.warning("step channel: no shared memory (%s); using gloo", err)
        self._gloo_broadcast(path)
        name = bytes(path.tolist()).rstrip(b"\0").decode()
        if not self.tp.is_leader and name:
            try:
                shm = shm_channel.ShmBroadcast.attach(name, self.tp.size - 1, self.tp.rank - 1)
            except OSError as err:
                log.warning(
                    "step channel: rank %d cannot map %s (%s); using gloo", self.tp.rank, name, err
                )
        ok = torch.tensor([int(shm is not None)], dtype=torch.int64)
        work = dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.tp.cpu_group, async_op=True)
        wait_bounded(work, self.timeout_s if self.tp.is_leader else None)
        if shm is not None and self.tp.is_leader:
            shm.unlink()
        if shm is not None and not int(ok.item()):
            shm.close()
            shm = None
        self._shm = shm

    def _send(self, header: torch.Tensor, payload: torch.Tensor) -> None:
        """Leader: one message (shared memory: header and payload in one hand-over)."""
        if not self._connected:
            self._connect()
        if self._shm is None:
            self._gloo_broadcast(header)
            if payload.numel():
                self._gloo_broadcast(payload)
        else:
            self._shm.send_framed(np.concatenate([header.numpy(), payload.numpy()]), self.timeout_s)

    def _recv(self) -> tuple[list[int], torch.Tensor]:
        """Follower: the next (header, payload)."""
        if not self._connected:
            self._connect()
        if self._shm is not None:
            words = torch.from_numpy(self._shm.recv_framed().view(np.int64))
            return words[:HEADER_LEN].tolist(), words[HEADER_LEN:]
        header_t = torch.empty(HEADER_LEN, dtype=torch.int64)
        self._gloo_broadcast(header_t)
        header = header_t.tolist()
        _check(header[7] >= 0, "payload length", f"{header[7]} < 0")
        payload = torch.empty(
            header[7] if header[0] != MessageKind.SHUTDOWN else 0, dtype=torch.int64
        )
        if payload.numel():
            self._gloo_broadcast(payload)
        return header, payload

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None

    def publish(self, inputs: StepInputs, step: int) -> None:
        """Leader only. Raises RuntimeError if a follower does not take it within `timeout_s`."""
        header, payload = pack(inputs, step)
        last, self._last_payload = self._last_payload, payload
        diff = _diff(last, payload)
        if diff is not None:
            header[0], header[7] = MessageKind.STEP_DIFF, diff.numel()
            payload = diff
            self.num_diff_steps += 1
        self._send(header, payload)

    def publish_kv(self, op: KVOp, seq: int) -> None:
        """Leader only: a KV read or write every follower joins (block ids must not be empty)."""
        header, payload = pack_kv(op, seq)
        self._send(header, payload)

    def publish_shutdown(self) -> None:
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[0] = MessageKind.SHUTDOWN
        self._send(header, torch.zeros(0, dtype=torch.int64))

    def receive(self) -> StepMessage:
        """Follower only: blocks until the leader publishes. Raises StepMessageError for a
        message that does not decode."""
        header, payload = self._recv()
        message, self._last_payload = decode(header, payload, self._last_payload)
        if header[0] == MessageKind.STEP_DIFF:
            self.num_diff_steps += 1
        return message


def decode(
    header: list[int], payload: torch.Tensor, last: torch.Tensor | None
) -> tuple[StepMessage, torch.Tensor | None]:
    """One message from its int64 header words and payload, and the full step payload it leaves
    as the previous one (`last` itself after a SHUTDOWN or KV op). Raises StepMessageError, and
    nothing else, for bytes that are not a message: a follower never crashes in a split."""
    kind = message_kind(header)
    if kind is MessageKind.SHUTDOWN:
        return StepMessage(kind, header[6], None), last
    if kind in (MessageKind.KV_READ, MessageKind.KV_WRITE):
        return StepMessage(kind, header[6], None, unpack_kv(header, payload)), last
    if kind is MessageKind.STEP_DIFF:
        if last is None:
            raise StepMessageError("kind", "a diff before any full step")
        payload = _apply_diff(last, payload)
    return StepMessage(MessageKind.STEP, header[6], unpack(header, payload)), payload


def _diff(last: torch.Tensor | None, payload: torch.Tensor) -> torch.Tensor | None:
    """[positions | values] of the words of `payload` that differ from `last`, or None when a
    full payload is as cheap (different length, or half or more of it changed)."""
    if last is None or last.numel() != payload.numel():
        return None
    new = payload.numpy()
    changed = np.flatnonzero(new != last.numpy())
    if changed.size * 2 >= new.size:
        return None
    return torch.from_numpy(np.concatenate([changed, new[changed]]))


def message_kind(header: list[int]) -> MessageKind:
    """The kind of a message header; StepMessageError for a short header or an unknown kind."""
    _checked_header(header)
    try:
        return MessageKind(header[0])
    except ValueError:
        raise StepMessageError("kind", f"unknown message kind {header[0]}") from None


def _checked_header(header: list[int]) -> list[int]:
    _check(len(header) == HEADER_LEN, "header", f"{len(header)} words != {HEADER_LEN}")
    return header


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise StepMessageError(field, message)


def _apply_diff(last: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """`last` with the diff's [positions | values] applied, in a copy. StepMessageError for an
    odd length or a position outside `last`."""
    n = diff.numel() // 2
    _check(diff.numel() == 2 * n, "payload", f"a diff of odd length {diff.numel()}")
    words = diff.numpy()
    if n:
        positions = words[:n]
        lo, hi = int(positions.min()), int(positions.max())
        _check(0 <= lo and hi < last.numel(), "payload", f"diff positions [{lo}, {hi}] outside")
    payload = last.numpy().copy()
    payload[words[:n]] = words[n:]
    return torch.from_numpy(payload)
