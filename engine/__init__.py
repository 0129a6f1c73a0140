"""Tandem's model runtime: `from engine import LLM, SamplingParams`."""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "EngineConfig"]


def __getattr__(name: str) -> Any:  # keep `import engine` light: torch loads on first use
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from engine.engine import LLMEngine

        return LLMEngine
    if name == "EngineConfig":
        from engine.config import EngineConfig

        return EngineConfig
    raise AttributeError(name)
