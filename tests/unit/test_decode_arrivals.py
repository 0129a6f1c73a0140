"""The decode worker's request table: allowed transitions, counts, and the one way out."""

from __future__ import annotations

import pytest

from decode_worker.arrivals import Arrival, Arrivals, ArrivalStatus
from engine.request import Request
from engine.sampling_params import SamplingParams

AWAITING_KV = ArrivalStatus.AWAITING_KV
KV_LANDED = ArrivalStatus.KV_LANDED_AWAITING_FIRST_TOKEN
RUNNING = ArrivalStatus.RUNNING
ALLOWED = {(AWAITING_KV, KV_LANDED), (AWAITING_KV, RUNNING), (KV_LANDED, RUNNING)}


def arrival(rid: str, first_token: int | None = None) -> Arrival:
    request = Request(rid, [1, 2, 3], SamplingParams(max_tokens=4))
    if first_token is not None:
        request.output_token_ids.append(first_token)
    return Arrival(request, accepted=0.0, num_blocks=1)


def table_in(status: ArrivalStatus, rid: str = "r") -> Arrivals:
    table = Arrivals()
    table.add(rid, arrival(rid))
    if status is not AWAITING_KV:
        table.advance(rid, status)
    return table


def test_a_streamed_request_walks_awaiting_kv_landed_running_then_leaves() -> None:
    table = Arrivals()
    table.add("r", arrival("r"))
    assert table.status("r") is AWAITING_KV and table.count(AWAITING_KV) == 1
    assert not table.get("r").has_first_token  # type: ignore[union-attr]
    table.advance("r", KV_LANDED)
    assert table.count(AWAITING_KV) == 0 and table.with_status(KV_LANDED)[0][0] == "r"
    table.advance("r", RUNNING)
    assert table.with_status(KV_LANDED) == [] and table.count(RUNNING) == 1
    left = table.remove("r")
    assert left is not None and left.status is RUNNING
    assert len(table) == 0 and table.status("r") is None and table.count(RUNNING) == 0


@pytest.mark.parametrize("start", list(ArrivalStatus), ids=lambda s: s.name)
@pytest.mark.parametrize("to", list(ArrivalStatus), ids=lambda s: s.name)
def test_only_forward_transitions_are_allowed(start: ArrivalStatus, to: ArrivalStatus) -> None:
    table = table_in(start)
    if (start, to) in ALLOWED:
        assert table.advance("r", to).status is to
    else:
        with pytest.raises(AssertionError):
            table.advance("r", to)
        assert table.status("r") is start and table.count(start) == 1


@pytest.mark.parametrize("status", list(ArrivalStatus), ids=lambda s: s.name)
def test_every_status_leaves_through_remove_with_the_counts_kept(status: ArrivalStatus) -> None:
    table = table_in(status)
    table.add("other", arrival("other", first_token=7))
    left = table.remove("r")
    assert left is not None and left.status is status  # the caller frees by this status
    assert table.remove("r") is None  # a second exit (abort after a timeout) finds nothing
    assert table.count(status) == (1 if status is AWAITING_KV else 0)
    assert [rid for rid, _ in table.with_status(AWAITING_KV)] == ["other"]
    assert table.get("other").has_first_token  # type: ignore[union-attr]


def test_requests_arrive_awaiting_their_kv_once() -> None:
    table = Arrivals()
    table.add("r", arrival("r"))
    with pytest.raises(AssertionError):
        table.add("r", arrival("r"))
    landed = arrival("s")
    landed.status = KV_LANDED
    with pytest.raises(AssertionError):
        table.add("s", landed)


def test_walking_a_status_allows_changes_meanwhile() -> None:
    table = Arrivals()
    for rid in ("a", "b", "c"):
        table.add(rid, arrival(rid))
    for rid, _ in table.with_status(AWAITING_KV):
        if rid == "b":
            table.remove(rid)
        else:
            table.advance(rid, RUNNING)
    assert table.count(RUNNING) == 2 and len(table) == 2
