"""A cluster configuration to simulate, and the SLO targets it is judged by. Pure, frozen."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SloTargets:
    """DistServe's attainment: a request meets its SLO when TTFT <= ttft_s and TPOT <= tpot_s;
    goodput is the highest rate at which at least `attainment` of requests meet it."""

    ttft_s: float
    tpot_s: float
    attainment: float = 0.9


@dataclass(frozen=True)
class EngineLimits:
    """Per-pool engine knobs the simulated scheduler runs with (and the spec is written with)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


@dataclass(frozen=True)
class ClusterConfig:
    """Disaggregated (`num_prefill` + `num_decode` workers) or colocated (`num_colocated`).

    Each worker is one TP group of `*_tp` GPUs; `link` names the profile's KV link. A config
    with one disaggregated pool only is a phase cell (`simulator.Phase`)."""

    num_prefill: int = 0
    prefill_tp: int = 1
    num_decode: int = 0
    decode_tp: int = 1
    num_colocated: int = 0
    colocated_tp: int = 1
    link: str = "nvlink"
    prefill_limits: EngineLimits = EngineLimits()
    decode_limits: EngineLimits = EngineLimits()
    colocated_limits: EngineLimits = EngineLimits()

    def __post_init__(self) -> None:
        disagg = self.num_prefill > 0 or self.num_decode > 0
        assert disagg != (self.num_colocated > 0), "disaggregated or colocated, not both"

    @property
    def colocated(self) -> bool:
        return self.num_colocated > 0

    @property
    def num_gpus(self) -> int:
        if self.colocated:
            return self.num_colocated * self.colocated_tp
        return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp

    def describe(self) -> str:
        if self.colocated:
            return f"colocated {self.num_colocated} x TP{self.colocated_tp}"
        return (
            f"{self.num_prefill}P x TP{self.prefill_tp} + {self.num_decode}D x TP{self.decode_tp}"
        )
