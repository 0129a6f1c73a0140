"""Goodput arithmetic (DistServe's definitions), pure: no cluster, no torch, no clock.

- `RequestRecord`: one request as the load generator saw it (seconds; `None` where it never got
  that far). TTFT = first token - send; TPOT = (e2e - ttft) / (output_tokens - 1).
- `summarize_rate(rate, records, slo)` -> `RateRecord`: P50/P90/P99 of TTFT and TPOT over the
  finished requests (numpy.percentile, linear interpolation) and SLO attainment over ALL sent
  requests: a request that failed or did not finish within the rate's time limit meets nothing.
- `goodput_rps(records, attainment)`: the highest swept rate whose attainment of both targets is
  >= `attainment` (0.9 in DistServe), or None when no swept rate reaches it. Hazard: this is the
  highest such rate, not the end of the first run of passing rates; a noisy sweep whose curve
  dips and recovers reports the recovered rate (the per-rate records show the dip).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


class GoodputInputError(ValueError):
    """A bad flag or workload; `field` names the flag (`--rates`, `--workloads`, ...)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class Slo:
    """Latency targets in seconds and the attainment goal (a fraction); all must be > 0."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9

    def __post_init__(self) -> None:
        for field, value in (("--ttft-slo-ms", self.ttft_s), ("--tpot-slo-ms", self.tpot_s)):
            if not (value > 0 and math.isfinite(value)):
                raise GoodputInputError(field, f"must be a positive number, got {value * 1e3:g}")
        if not 0 < self.attainment <= 1:
            raise GoodputInputError("--attainment", f"must be in (0, 1], got {self.attainment}")


@dataclass(frozen=True)
class RequestRecord:
    """One request. `arrival_s`: its planned send time from the rate's start. `ttft_s`, `e2e_s`
    are None when it failed or was cut off by the time limit (`error` says which)."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None
    e2e_s: float | None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.error is None and self.ttft_s is not None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """(e2e - ttft) / (output_tokens - 1); 0.0 for a one-token output (no gaps to time)."""
        if not self.finished:
            return None
        assert self.ttft_s is not None and self.e2e_s is not None
        return (self.e2e_s - self.ttft_s) / max(self.output_tokens - 1, 1)

    def meets(self, slo: Slo) -> tuple[bool, bool]:
        """(TTFT met, TPOT met); an unfinished request meets neither."""
        tpot = self.tpot_s
        if tpot is None or self.ttft_s is None:
            return False, False
        return self.ttft_s <= slo.ttft_s, tpot <= slo.tpot_s


@dataclass(frozen=True)
class Attainment:
    """Fractions of sent requests meeting the TTFT target, the TPOT target, and both."""

    ttft: float
    tpot: float
    both: float


@dataclass(frozen=True)
class RateRecord:
    """One swept rate. Percentile dicts map "p50"/"p90"/"p99" to seconds (None: none finished)."""

    rate: float
    num_sent: int
    num_finished: int
    num_failed: int
    duration_s: float
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    attainment: Attainment
    requests: tuple[RequestRecord, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["requests"] = [_request_json(r) for r in self.requests]
        return out


def _request_json(r: RequestRecord) -> dict[str, Any]:
    return asdict(r) | {"tpot_s": r.tpot_s}


def percentiles(values: list[float]) -> dict[str, float | None]:
    """P50/P90/P99 (numpy linear interpolation); None for each when `values` is empty."""
    if not values:
        return {f"p{q}": None for q in PERCENTILES}
    got = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
    return {f"p{q}": float(v) for q, v in zip(PERCENTILES, got)}


def attainment(records: list[RequestRecord], slo: Slo) -> Attainment:
    """Fractions over all of `records` (0.0 each when there are none)."""
    if not records:
        return Attainment(0.0, 0.0, 0.0)
    met = [r.meets(slo) for r in records]
    n = len(records)
    return Attainment(
        ttft=sum(t for t, _ in met) / n,
        tpot=sum(p for _, p in met) / n,
        both=sum(t and p for t, p in met) / n,
    )


def summarize_rate(
    rate: float, records: list[RequestRecord], slo: Slo, duration_s: float
) -> RateRecord:
    finished = [r for r in records if r.finished]
    return RateRecord(
        rate=rate,
        num_sent=len(records),
        num_finished=len(finished),
        num_failed=len(records) - len(finished),
        duration_s=duration_s,
        ttft_s=percentiles([r.ttft_s for r in finished if r.ttft_s is not None]),
        tpot_s=percentiles([r.tpot_s for r in finished if r.tpot_s is not None]),
        attainment=attainment(records, slo),
        requests=tuple(records),
    )


def goodput_rps(rates: list[RateRecord], target: float) -> float | None:
    """The highest rate whose attainment of both targets is >= `target`; None if none is."""
    passing = [r.rate for r in rates if r.num_sent > 0 and r.attainment.both >= target]
    return max(passing) if passing else None


def per_device(goodput: float | None, num_devices: int) -> float | None:
    assert num_devices > 0, num_devices
    return None if goodput is None else goodput / num_devices


def parse_rates(text: str) -> list[float]:
    """ "0.5,1,2" -> [0.5, 1.0, 2.0] (sorted, deduplicated); raises GoodputInputError('--rates')."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise GoodputInputError("--rates", "the list of request rates is empty")
    try:
        rates = [float(p) for p in parts]
    except ValueError:
        reason = f"{text!r} is not a comma-separated list of numbers"
        raise GoodputInputError("--rates", reason) from None
    bad = [r for r in rates if not (r > 0 and math.isfinite(r))]
    if bad:
        raise GoodputInputError("--rates", f"rates must be positive requests/s, got {bad[0]:g}")
    return sorted(set(rates))
