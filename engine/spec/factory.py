"""Builds the proposer a SpeculativeConfig names, for one model runner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.spec.config import SpeculativeConfig
from engine.spec.proposer import NgramProposer, Proposer

if TYPE_CHECKING:
    from engine.runner.model_runner import ModelRunner


def build_proposer(config: SpeculativeConfig | None, runner: ModelRunner | Any) -> Proposer | None:
    """None without speculation. Model-based proposers load their checkpoint here, against the
    target's vocabulary (a mismatch is an EngineConfigError naming speculative_config.model),
    and refuse tensor_parallel_size > 1 (naming speculative_config.method)."""
    if config is None:
        return None
    if config.method == "ngram":
        return NgramProposer(config)
    # imported here: they import the runner's modules, which import this one
    if config.method == "draft_model":
        from engine.spec.draft_model import DraftModelProposer

        return DraftModelProposer(config, runner)
    assert config.method == "eagle", config.method  # SpeculativeConfig checked the name
    from engine.spec.draft_head import DraftHeadProposer

    return DraftHeadProposer(config, runner)
