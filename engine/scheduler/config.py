"""The scheduler's settings: frozen and validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import check_config
from engine.spec.lookahead import LookaheadPolicy


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Continuous-batching limits of one engine.

    `max_num_batched_tokens` is the token budget of one step; `max_num_seqs` caps the running
    batch. Without chunked prefill a prompt must fit the budget whole, so the budget must
    cover `max_model_len`. `watermark` is the fraction of usable blocks that admission leaves
    free for running requests to grow into. A request older than `starvation_timeout_s`
    jumps every queue (see engine.scheduler.policy). `speculation` (None: off) reserves
    lookahead slots for draft tokens on decode rows (engine.spec.lookahead).
    """

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    watermark: float = 0.01
    starvation_timeout_s: float = 30.0
    speculation: LookaheadPolicy | None = None

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            check_config(_positive_int(getattr(self, name)), name, "must be an integer >= 1")
        for name in ("enable_chunked_prefill", "enable_prefix_caching"):
            check_config(isinstance(getattr(self, name), bool), name, "must be a bool")
        check_config(
            isinstance(self.watermark, (int, float)) and 0.0 <= self.watermark < 1.0,
            "watermark",
            "must be in [0, 1)",
        )
        check_config(
            isinstance(self.starvation_timeout_s, (int, float))
            and not math.isnan(self.starvation_timeout_s)
            and self.starvation_timeout_s > 0,
            "starvation_timeout_s",
            "must be > 0 (math.inf disables the guard)",
        )
        check_config(
            self.enable_chunked_prefill or self.max_num_batched_tokens >= self.max_model_len,
            "max_num_batched_tokens",
            f"is {self.max_num_batched_tokens} < max_model_len {self.max_model_len}; without "
            "chunked prefill a whole prompt must fit one step",
        )
