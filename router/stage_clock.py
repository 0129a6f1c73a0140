"""Stage timings of one request that add up to its end-to-end latency. Pure (no I/O).

Workers report durations measured on their engine threads; the router sees the boundaries
between them on its own clock (`time.monotonic()` of the router process: durations from
another process are never mixed with its timestamps). The router's marks cut the request into
disjoint spans, and each span is attributed to stages:

  arrival --router_queue--> dispatched --(prefill span)--> prefill_done --(handoff)--> decode_started --(decode span)--> end

  * router_queue  = dispatched - arrival: validation, the router queue, placement;
  * prefill       = the worker's compute time (first scheduled -> first token);
  * prefill_queue = the rest of the prefill span: the hop to the worker, its queue, the hop back;
  * kv_transfer   = handoff (the router streams the first token and dispatches decode) + the
                    decode worker's transfer time: the KV waiting for, then moving to, decode;
  * decode_queue  = the decode worker's queue (KV landed -> first scheduled);
  * decode        = the rest of the decode span: decoding and delivering the tokens.

Colocated (no handoff): prefill span = dispatched -> first token seen by the router; decode =
first token -> end (decode_queue 0). A request that ended before a span began leaves that
span's stages unset; whatever the router did after the last mark goes to the last stage set.
So the set stages sum to end_to_end (up to clamping of clock jitter at 0).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.worker_api import StageTimes
from tandem.api import generation_pb2 as pb


@dataclass(frozen=True)
class StageMarks:
    """Router-clock instants (monotonic seconds); None where the request never got there."""

    arrival: float
    dispatched: float | None = None  # the first worker call was made
    prefill_done: float | None = None  # the first token reached the router
    decode_started: float | None = None  # disaggregated: the decode worker's `start` was called
    colocated: bool = False


def _pos(x: float) -> float:
    return max(0.0, x)


def stage_timings(
    marks: StageMarks, prefill: StageTimes | None, decode: StageTimes | None, end: float
) -> pb.StageTimings:
    """The final message's StageTimings; see the module docstring for the attribution."""
    msg = pb.StageTimings(end_to_end=_pos(end - marks.arrival))
    ttft_at = marks.prefill_done if marks.prefill_done is not None else end
    msg.time_to_first_token = _pos(ttft_at - marks.arrival)
    if marks.dispatched is None:
        msg.router_queue = msg.end_to_end
        return msg
    msg.router_queue = _pos(marks.dispatched - marks.arrival)
    prefill_end = marks.prefill_done if marks.prefill_done is not None else end
    _split_prefill(msg, prefill_end - marks.dispatched, decode if marks.colocated else prefill)
    if marks.prefill_done is None:
        return msg
    if marks.colocated:
        msg.decode_queue = 0.0
        msg.decode = _pos(end - marks.prefill_done)
    elif marks.decode_started is None:  # ended at its first token (or failed before decode)
        msg.prefill_queue += _pos(end - marks.prefill_done)
    else:
        _split_decode(msg, marks.decode_started - marks.prefill_done, end - marks.decode_started, decode)
    return msg


def _split_prefill(msg: pb.StageTimings, span: float, times: StageTimes | None) -> None:
    compute = times.prefill if times is not None and times.prefill is not None else 0.0
    compute = min(_pos(compute), _pos(span))
    msg.prefill = compute
    msg.prefill_queue = _pos(span) - compute


def _split_decode(msg: pb.StageTimings, handoff: float, span: float, times: StageTimes | None) -> None:
    span = _pos(span)
    transfer = queue = 0.0
    if times is not None:
        transfer = min(_pos(times.kv_transfer or 0.0), span)
        queue = min(_pos(times.decode_queue or 0.0), span - transfer)
    msg.kv_transfer = _pos(handoff) + transfer
    msg.decode_queue = queue
    msg.decode = span - transfer - queue
