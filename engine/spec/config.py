"""`speculative_config`: which proposer, how many draft tokens, when to stop speculating.

The keys follow vLLM's (`method`, `num_speculative_tokens`, `model`, `prompt_lookup_min`,
`prompt_lookup_max`, `disable_by_batch_size`), so a user's JSON carries over. Pure: no torch.
Parsed once at start-up; every error names the field as `speculative_config.<key>`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from engine.errors import EngineConfigError

METHODS = ("ngram", "draft_model", "eagle")
MAX_SPECULATIVE_TOKENS = 16
_ALIASES = {"draft": "draft_model", "[ngram]": "ngram", "eagle3": "eagle", "medusa": "eagle"}


def _fail(key: str, message: str) -> EngineConfigError:
    return EngineConfigError(f"speculative_config.{key}: {message}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """One engine's speculation settings (validated at construction).

    `num_speculative_tokens` is k, the most drafts per request per step. `prompt_lookup_*`
    bound the n-gram the `ngram` proposer matches (longest first). `model` is the draft model's
    or the draft head's checkpoint (`draft_model`, `eagle`). Speculation switches off for a step
    whose running batch exceeds `disable_by_batch_size` (None: never), and with `dynamic` each
    request's own k follows its recent acceptance (engine.spec.lookahead).
    """

    method: str
    num_speculative_tokens: int
    model: str | None = None
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    disable_by_batch_size: int | None = None
    dynamic: bool = True

    def __post_init__(self) -> None:
        method = _ALIASES.get(self.method, self.method)
        object.__setattr__(self, "method", method)
        if method not in METHODS:
            raise _fail("method", f"{self.method!r} is not one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise _fail(
                "num_speculative_tokens", f"{k!r}; must be in [1, {MAX_SPECULATIVE_TOKENS}]"
            )
        if method != "ngram" and not self.model:
            raise _fail("model", f"method {method!r} needs a draft checkpoint")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise _fail(
                "prompt_lookup_min",
                f"{self.prompt_lookup_min}; must be >= 1 and <= prompt_lookup_max "
                f"({self.prompt_lookup_max})",
            )
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise _fail("disable_by_batch_size", f"{self.disable_by_batch_size}; must be >= 1")

    @staticmethod
    def parse(
        value: SpeculativeConfig | Mapping[str, Any] | str | None,
    ) -> SpeculativeConfig | None:
        """From a mapping or its JSON text (the CLI's `--speculative-config`); None passes."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise EngineConfigError(f"speculative_config: not JSON ({err.msg})") from None
        if not isinstance(value, Mapping):
            raise EngineConfigError("speculative_config: must be a JSON object")
        known = {f.name for f in fields(SpeculativeConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise _fail(unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
        for key in ("method", "num_speculative_tokens"):
            if key not in value:
                raise _fail(key, "missing")
        return SpeculativeConfig(**dict(value))

    def check_model_len(self, max_model_len: int) -> None:
        """k drafts must fit a context of `max_model_len` with room for a prompt."""
        if self.num_speculative_tokens >= max_model_len - 1:
            raise _fail(
                "num_speculative_tokens",
                f"{self.num_speculative_tokens} is too large for max_model_len {max_model_len}",
            )
