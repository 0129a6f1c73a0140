"""Placement and admission: which workers serve a request, or why it is rejected. Pure.

Decode first: a decode worker needs KV headroom (free blocks, minus blocks the router promised
since its last snapshot, >= the blocks the whole sequence needs); among those, the lowest
predicted TPOT under the added load wins. Then prefill: the lowest predicted TTFT, where

    TTFT = queue wait (queued prompt tokens * per-token cost + per-request overhead of waiters)
         + prefill of the uncached prompt tokens (prefix hits estimated by the router)
         + transfer of the prompt's KV to the decode worker.

Admission: a request whose best prediction misses its SLO target is rejected with a reason
(the server answers RESOURCE_EXHAUSTED) unless it is best-effort, which is then placed on the
best worker anyway. KV headroom is a hard constraint even for best-effort requests: a request
that fits an idle worker but no worker now is rejected with `Rejection.no_room` set (the flow
parks a best-effort one in the router queue until room frees; an SLO one is refused).

Bookings: what a placement adds to its workers' load before their snapshots can show it
(`bookings`); the registry keeps them (`WorkerRegistry.reserve`) and the views above read them.
Every request the router placed and the worker's snapshot cannot show yet (not started there,
or started after the snapshot was asked for) counts in the predictions: TPOT grows with each
request admitted between two heartbeats, and KV headroom shrinks by the blocks booked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.utils.math import cdiv
from router.slo import Slo
from tandem.contract.worker_api import CostModel, LoadSnapshot


@dataclass(frozen=True)
class WorkerView:
    """What the policy knows of one healthy worker: its last snapshot plus the router's own delta.

    `pending_prefill_tokens`: prompt tokens the router sent that have not finished prefill.
    `started_since_snapshot` / `reserved_blocks`: decode requests and KV blocks the router
    placed on the worker that `load` does not show: placed and not yet started there (still
    queued or prefilling elsewhere, however many snapshots came since), or started after `load`
    was asked for.
    """

    worker_id: str
    load: LoadSnapshot
    cost: CostModel
    pending_prefill_tokens: int = 0
    started_since_snapshot: int = 0
    reserved_blocks: int = 0

    @property
    def free_blocks(self) -> int:
        return self.load.num_free_blocks - self.reserved_blocks


@dataclass(frozen=True)
class Demand:
    """A request as the policy sees it. `max_new_tokens` is already capped by the context."""

    num_prompt_tokens: int
    max_new_tokens: int
    slo: Slo


@dataclass(frozen=True)
class PrefillChoice:
    worker_id: str
    predicted_ttft_s: float
    num_cached_tokens: int


@dataclass(frozen=True)
class DecodeChoice:
    worker_id: str
    predicted_tpot_s: float
    num_blocks: int


@dataclass(frozen=True)
class Placement:
    """Where to run. `decode` is None in colocated mode (the prefill worker decodes too).

    `slo_at_risk` is True when a best-effort request was placed although a target is missed.
    """

    prefill: PrefillChoice
    decode: DecodeChoice | None
    slo_at_risk: bool = False


@dataclass(frozen=True)
class Rejection:
    """Why a request cannot be placed. `no_room`: only KV headroom is missing, and some worker
    would fit the request once its load drains (waiting may help; nothing else would)."""

    reason: str
    no_room: bool = False


def predict_queue_wait(view: WorkerView) -> float:
    queued = max(view.load.num_queued_prefill_tokens, view.pending_prefill_tokens)
    return (
        queued * view.cost.prefill_s_per_token
        + view.load.num_waiting * view.cost.prefill_s_per_request
    )


def predict_ttft(
    view: WorkerView, demand: Demand, num_cached_tokens: int, *, transfer: bool
) -> float:
    uncached = max(demand.num_prompt_tokens - num_cached_tokens, 1)
    ttft = predict_queue_wait(view) + view.cost.prefill_seconds(uncached)
    if transfer:
        ttft += view.cost.transfer_seconds(demand.num_prompt_tokens)
    return ttft


def predict_tpot(view: WorkerView, demand: Demand) -> float:
    """Step time with this request added: batch + 1, context + its average length."""
    load = view.load
    batch = load.num_running + load.num_waiting + view.started_since_snapshot + 1
    context = (
        load.num_used_blocks * load.block_size
        + view.reserved_blocks * load.block_size
        + demand.num_prompt_tokens
        + demand.max_new_tokens // 2
    )
    return view.cost.decode_step_seconds(batch, context)


def _no_room(views: Sequence[WorkerView], num_tokens: int, who: str) -> Rejection:
    """No worker has room for `num_tokens` now; `no_room` if one would when idle."""
    fits_idle = any(cdiv(num_tokens, v.load.block_size) <= v.load.num_total_blocks for v in views)
    return Rejection(f"{who} has KV room for {num_tokens} tokens", no_room=fits_idle)


def _misses(predicted: float, target: float | None) -> bool:
    return target is not None and predicted > target


def place_decode(views: Sequence[WorkerView], demand: Demand) -> DecodeChoice | Rejection:
    """The decode worker with room for the whole sequence and the lowest predicted TPOT."""
    if not views:
        return Rejection("no healthy decode worker")
    num_tokens = demand.num_prompt_tokens + demand.max_new_tokens
    scored: list[tuple[float, int, WorkerView, int]] = []
    for view in views:
        need = cdiv(num_tokens, view.load.block_size)
        if view.free_blocks >= need:
            scored.append((predict_tpot(view, demand), -view.free_blocks, view, need))
    if not scored:
        return _no_room(views, num_tokens, "no decode worker")
    tpot, _, best, need = min(scored, key=lambda s: (s[0], s[1]))
    if _misses(tpot, demand.slo.tpot_s) and not demand.slo.best_effort:
        return Rejection(
            f"predicted TPOT {tpot * 1e3:.1f} ms exceeds the {demand.slo.tpot_s * 1e3:.1f} ms "  # type: ignore[operator]
            "target on every decode worker"
        )
    return DecodeChoice(best.worker_id, tpot, need)


def place_prefill(
    views: Sequence[WorkerView],
    demand: Demand,
    cached_tokens: Mapping[str, int],
    *,
    transfer: bool = True,
) -> PrefillChoice | Rejection:
    """The prefill worker with the lowest predicted TTFT; `cached_tokens` are estimated hits."""
    if not views:
        return Rejection("no healthy prefill worker")
    best: PrefillChoice | None = None
    for view in views:
        hits = cached_tokens.get(view.worker_id, 0)
        ttft = predict_ttft(view, demand, hits, transfer=transfer)
        if best is None or ttft < best.predicted_ttft_s:
            best = PrefillChoice(view.worker_id, ttft, hits)
    assert best is not None
    if _misses(best.predicted_ttft_s, demand.slo.ttft_s) and not demand.slo.best_effort:
        return Rejection(
            f"predicted TTFT {best.predicted_ttft_s * 1e3:.1f} ms exceeds the "
            f"{demand.slo.ttft_s * 1e3:.1f} ms target on every prefill worker"  # type: ignore[operator]
        )
    return best


def _at_risk(demand: Demand, ttft: float, tpot: float | None) -> bool:
    return _misses(ttft, demand.slo.ttft_s) or (
        tpot is not None and _misses(tpot, demand.slo.tpot_s)
    )


def place(
    prefill_views: Sequence[WorkerView],
    decode_views: Sequence[WorkerView],
    demand: Demand,
    cached_tokens: Mapping[str, int],
) -> Placement | Rejection:
    """Disaggregated placement: decode worker first (a hard KV constraint), then prefill."""
    decode = place_decode(decode_views, demand)
    if isinstance(decode, Rejection):
        return decode
    prefill = place_prefill(prefill_views, demand, cached_tokens, transfer=True)
    if isinstance(prefill, Rejection):
        return prefill
    return Placement(
        prefill, decode, _at_risk(demand, prefill.predicted_ttft_s, decode.predicted_tpot_s)
    )


def place_colocated(
    views: Sequence[WorkerView], demand: Demand, cached_tokens: Mapping[str, int]
) -> Placement | Rejection:
    """Colocated placement: one worker needs KV room and meets both targets; lowest TTFT wins."""
    if not views:
        return Rejection("no healthy colocated worker")
    roomy = [v for v in views if isinstance(place_decode([v], _best_effort(demand)), DecodeChoice)]
    if not roomy:
        return _no_room(views, demand.num_prompt_tokens + demand.max_new_tokens, "no worker")
    feasible = [v for v in roomy if not _misses(predict_tpot(v, demand), demand.slo.tpot_s)]
    candidates = feasible or (roomy if demand.slo.best_effort else [])
    if not candidates:
        tpot = min(predict_tpot(v, demand) for v in roomy)
        return Rejection(
            f"predicted TPOT {tpot * 1e3:.1f} ms exceeds the "
            f"{demand.slo.tpot_s * 1e3:.1f} ms target on every worker"  # type: ignore[operator]
        )
    prefill = place_prefill(candidates, demand, cached_tokens, transfer=False)
    if isinstance(prefill, Rejection):
        return prefill
    chosen = next(v for v in candidates if v.worker_id == prefill.worker_id)
    tpot = predict_tpot(chosen, demand)
    return Placement(prefill, None, _at_risk(demand, prefill.predicted_ttft_s, tpot))


def _best_effort(demand: Demand) -> Demand:
    return Demand(
        demand.num_prompt_tokens, demand.max_new_tokens, Slo(None, None, True, demand.slo.priority)
    )


@dataclass(frozen=True)
class Booking:
    """Load a placed request adds to one worker before the worker's snapshot shows it.

    `num_prefill_tokens`: prompt tokens to prefill, held until the prefill ends. A decode start
    and `num_kv_blocks`: held until a snapshot of the worker asked for after the request started
    there (which shows them) or the end of the request, whichever comes first. A snapshot taken
    while the request is still queued or prefilling does not show it, so it does not clear it.
    """

    worker_id: str
    num_prefill_tokens: int = 0
    num_decode_starts: int = 0
    num_kv_blocks: int = 0


def bookings(plan: Placement, num_prompt_tokens: int) -> tuple[Booking, ...]:
    """What `plan` books: the uncached prompt on the prefill worker, a start and the sequence's
    KV blocks on the decode worker. Colocated: the whole prompt and a start on the one worker,
    no KV blocks (a colocated placement counts none; its worker's snapshot shows them)."""
    if plan.decode is None:
        return (Booking(plan.prefill.worker_id, num_prompt_tokens, num_decode_starts=1),)
    uncached = num_prompt_tokens - plan.prefill.num_cached_tokens
    decode = Booking(
        plan.decode.worker_id, num_decode_starts=1, num_kv_blocks=plan.decode.num_blocks
    )
    return (Booking(plan.prefill.worker_id, num_prefill_tokens=uncached), decode)
