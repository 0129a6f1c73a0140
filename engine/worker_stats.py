"""Load figures of one engine, read on its loop thread (the worker heartbeat's payload)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.engine import LLMEngine


@dataclass(frozen=True)
class EngineLoad:
    num_queued_prefill_tokens: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    num_preemptions_total: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_draft_tokens_total: int = 0  # speculative decoding: drafts verified
    num_accepted_tokens_total: int = 0  # and of those, accepted


def engine_load(engine: LLMEngine) -> EngineLoad:
    """Must run on the engine's thread (EngineLoop.call)."""
    stats = engine.stats()
    queued = sum(r.num_tokens - r.num_computed_tokens for r in engine.scheduler.waiting_requests())
    return EngineLoad(
        num_queued_prefill_tokens=queued,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_free_blocks=stats.num_free_blocks,
        num_total_blocks=stats.num_usable_blocks,
        block_size=engine.config.block_size,
        num_preemptions_total=stats.num_preemptions_total,
        prefix_queried_tokens=stats.prefix_queried_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        num_draft_tokens_total=engine.scheduler.num_draft_tokens_total,
        num_accepted_tokens_total=engine.scheduler.num_accepted_tokens_total,
    )
