"""The decode worker's requests by status: one table, explicit transitions. Pure (no torch).

    start() -> AWAITING_KV --KV done, first token known--> RUNNING --finish--> gone
               AWAITING_KV --KV done, no first token yet--> KV_LANDED_AWAITING_FIRST_TOKEN
               KV_LANDED_AWAITING_FIRST_TOKEN --first token--> RUNNING
    (a streamed request's first token may also come while it is AWAITING_KV: it stays there)
    exits: KV failed or abort (AWAITING_KV); first-token timeout or abort
           (KV_LANDED_AWAITING_FIRST_TOKEN); finish or abort (RUNNING)

What each status holds, so what leaving it must free (the worker does, `DecodeWorker._leave`):
  * AWAITING_KV: blocks the transport is writing: they come back through the receiver's
    `on_release` once writes stopped (after a failure, or a cancel: inside it, or on a later
    poll, which the worker keeps making until they came back), except where the transfer
    finished just before the cancel (it then reads DONE): they hold its KV and are freed at once;
  * KV_LANDED_AWAITING_FIRST_TOKEN: blocks holding the KV, owned by nothing else: freed at once;
  * RUNNING: the engine's scheduler owns the request and its blocks: `engine.abort` frees them.
The table only records; it is used from the engine thread alone.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass

from engine.request import Request


class ArrivalStatus(enum.Enum):
    AWAITING_KV = "awaiting_kv"
    KV_LANDED_AWAITING_FIRST_TOKEN = "kv_landed_awaiting_first_token"
    RUNNING = "running"


_NEXT: dict[ArrivalStatus, frozenset[ArrivalStatus]] = {
    ArrivalStatus.AWAITING_KV: frozenset(
        {ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN, ArrivalStatus.RUNNING}
    ),
    ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN: frozenset({ArrivalStatus.RUNNING}),
    ArrivalStatus.RUNNING: frozenset(),
}


@dataclass(eq=False)
class Arrival:
    """A request accepted here. Times are `time.monotonic()` of this process."""

    request: Request
    accepted: float
    num_blocks: int  # blocks the transfer writes (for the bytes-received metric)
    status: ArrivalStatus = ArrivalStatus.AWAITING_KV
    kv_landed: float | None = None
    first_token_at: float | None = None  # when a streamed request's first token came

    @property
    def has_first_token(self) -> bool:
        return bool(self.request.output_token_ids)


class Arrivals:
    """Every request accepted here until it leaves, with its status. `advance` checks that a
    transition is allowed; `remove` is the one way out."""

    def __init__(self) -> None:
        self._by_id: dict[str, Arrival] = {}
        self._counts: Counter[ArrivalStatus] = Counter()

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, request_id: str) -> Arrival | None:
        return self._by_id.get(request_id)

    def status(self, request_id: str) -> ArrivalStatus | None:
        arrival = self._by_id.get(request_id)
        return None if arrival is None else arrival.status

    def add(self, request_id: str, arrival: Arrival) -> None:
        assert request_id not in self._by_id, f"{request_id} is here already"
        assert arrival.status is ArrivalStatus.AWAITING_KV, "requests arrive awaiting their KV"
        self._by_id[request_id] = arrival
        self._counts[arrival.status] += 1

    def advance(self, request_id: str, status: ArrivalStatus) -> Arrival:
        arrival = self._by_id[request_id]
        assert status in _NEXT[arrival.status], f"{request_id}: {arrival.status} -> {status}"
        self._counts[arrival.status] -= 1
        self._counts[status] += 1
        arrival.status = status
        return arrival

    def remove(self, request_id: str) -> Arrival | None:
        """Forget the request (any status); None if it is not here."""
        arrival = self._by_id.pop(request_id, None)
        if arrival is not None:
            self._counts[arrival.status] -= 1
        return arrival

    def count(self, status: ArrivalStatus) -> int:
        return self._counts[status]

    def with_status(self, status: ArrivalStatus) -> list[tuple[str, Arrival]]:
        """A snapshot (safe to change the table while walking it); O(1) when there are none."""
        if not self._counts[status]:
            return []
        return [(rid, a) for rid, a in self._by_id.items() if a.status is status]
