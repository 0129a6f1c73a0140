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

from dataclasses import dataclass, replace

from tandem.contract.worker_api import StageTimes


@dataclass(frozen=True)
class StageMarks:
    """Router-clock instants (monotonic seconds); None where the request never got there."""

    arrival: float
    dispatched: float | None = None  # the first worker call was made
    prefill_done: float | None = None  # the first token reached the router
    decode_started: float | None = None  # disaggregated: the decode worker's `start` was called
    colocated: bool = False


@dataclass(frozen=True)
class StageTimings:
    """Seconds per stage of one request; None where the request never reached the stage.

    The set stages sum to `end_to_end`; `time_to_first_token` is the arrival -> first token span.
    """

    end_to_end: float
    time_to_first_token: float
    router_queue: float | None = None
    prefill_queue: float | None = None
    prefill: float | None = None
    kv_transfer: float | None = None
    decode_queue: float | None = None
    decode: float | None = None


def _pos(x: float) -> float:
    return max(0.0, x)


def stage_timings(
    marks: StageMarks, prefill: StageTimes | None, decode: StageTimes | None, end: float
) -> StageTimings:
    """The request's stage timings; see the module docstring for the attribution."""
    end_to_end = _pos(end - marks.arrival)
    ttft_at = marks.prefill_done if marks.prefill_done is not None else end
    base = StageTimings(end_to_end, _pos(ttft_at - marks.arrival))
    if marks.dispatched is None:
        return replace(base, router_queue=end_to_end)
    prefill_end = marks.prefill_done if marks.prefill_done is not None else end
    worker_times = decode if marks.colocated else prefill
    queue, compute = _split_prefill(prefill_end - marks.dispatched, worker_times)
    router_queue = _pos(marks.dispatched - marks.arrival)
    timings = replace(base, router_queue=router_queue, prefill_queue=queue, prefill=compute)
    if marks.prefill_done is None:
        return timings
    if marks.colocated:
        return replace(timings, decode_queue=0.0, decode=_pos(end - marks.prefill_done))
    if marks.decode_started is None:  # ended at its first token (or failed before decode)
        return replace(timings, prefill_queue=queue + _pos(end - marks.prefill_done))
    handoff, span = marks.decode_started - marks.prefill_done, end - marks.decode_started
    return _split_decode(timings, handoff, span, decode)


def _split_prefill(span: float, times: StageTimes | None) -> tuple[float, float]:
    """(prefill_queue, prefill) of the prefill span: the worker's compute, the rest queue."""
    compute = times.prefill if times is not None and times.prefill is not None else 0.0
    compute = min(_pos(compute), _pos(span))
    return _pos(span) - compute, compute


def _split_decode(
    timings: StageTimings, handoff: float, span: float, times: StageTimes | None
) -> StageTimings:
    span = _pos(span)
    transfer = queue = 0.0
    if times is not None:
        transfer = min(_pos(times.kv_transfer or 0.0), span)
        queue = min(_pos(times.decode_queue or 0.0), span - transfer)
    return replace(
        timings,
        kv_transfer=_pos(handoff) + transfer,
        decode_queue=queue,
        decode=span - transfer - queue,
    )
