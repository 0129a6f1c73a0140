"""What one simulated run produced: each request's fate, and the run as a whole."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request
from router.registry import Reservation
from tandem.plan.cluster import ClusterConfig, SloTargets


@dataclass
class RequestRecord:
    """One request's fate. Times in simulated seconds; `failed` says why it never finished."""

    index: int
    arrival: float
    prompt_len: int
    output_len: int
    first_token: float | None = None
    finish: float | None = None
    failed: str | None = None
    reservation: Reservation | None = None
    prefill_id: str | None = None
    decode_id: str | None = None
    prefill_request: Request | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None:
            return None
        return (self.finish - self.first_token) / max(self.output_len - 1, 1)

    def meets(self, slo: SloTargets) -> bool:
        ttft, tpot = self.ttft, self.tpot
        return ttft is not None and tpot is not None and ttft <= slo.ttft_s and tpot <= slo.tpot_s


@dataclass
class SimResult:
    config: ClusterConfig
    rate: float
    records: list[RequestRecord]
    sim_end: float
    wall_s: float
    num_steps: int
    stopped_early: bool
    rejections: dict[str, int] = field(default_factory=dict)

    def attainment(self, slo: SloTargets) -> float:
        if not self.records:
            return 1.0
        return sum(r.meets(slo) for r in self.records) / len(self.records)
