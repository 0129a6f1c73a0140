"""Sampling parameters of one request: frozen, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import check_request

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TEMPERATURE = 100.0
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it
MAX_GRAMMAR_CHARS = 64 * 1024
STRUCTURED_KINDS = ("json_object", "json_schema", "regex", "ebnf")


def _int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output: `kind` is one of STRUCTURED_KINDS; `spec` the JSON schema
    (text), the regex or the EBNF grammar; empty for json_object (any JSON object)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        check_request(
            self.kind in STRUCTURED_KINDS,
            "structured",
            f"unknown kind {self.kind!r}; one of {', '.join(STRUCTURED_KINDS)}",
        )
        check_request(isinstance(self.spec, str), "structured", "the spec must be a string")
        check_request(
            (self.kind == "json_object") == (self.spec == ""),
            "structured",
            "json_object takes no spec; the other kinds need one",
        )
        check_request(
            len(self.spec) <= MAX_GRAMMAR_CHARS,
            "structured",
            f"the spec is {len(self.spec)} characters; at most {MAX_GRAMMAR_CHARS}",
        )


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy. top_k 0 disables top-k; top_p 1 and min_p 0 disable theirs.
    repetition_penalty follows Hugging Face (divides positive logits of seen tokens, prompt
    included); presence / frequency penalties follow OpenAI (subtracted, output tokens only).
    A `seed` makes sampling reproducible whatever else shares the batch.
    `max_tokens=None` means "until the context is full".
    `logit_bias` ((token id, bias), ...) is added to the raw logits (OpenAI: [-100, 100]);
    `structured` constrains the output to a grammar (see engine.sampling.grammar).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # Accept lists from callers but store tuples, so the object stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias
        items = bias.items() if isinstance(bias, dict) else bias
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in items))
        self._validate()

    def _validate(self) -> None:
        check_request(_int(self.n) and 1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]")
        check_request(
            _finite(self.temperature) and 0.0 <= self.temperature <= MAX_TEMPERATURE,
            "temperature",
            f"must be a finite number in [0, {MAX_TEMPERATURE}]",
        )
        check_request(_int(self.top_k) and self.top_k >= 0, "top_k", "must be >= 0 (0 disables)")
        check_request(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check_request(
            _finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"
        )
        check_request(
            _finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "must be in (0, 10]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check_request(_finite(value) and -2.0 <= value <= 2.0, name, "must be in [-2, 2]")
        check_request(
            self.seed is None or (_int(self.seed) and 0 <= self.seed < 2**63),
            "seed",
            "must be an integer in [0, 2^63)",
        )
        check_request(
            self.max_tokens is None or (_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "must be >= 1",
        )
        check_request(_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be >= 0")
        check_request(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens",
            "must not exceed max_tokens",
        )
        self._validate_stops()
        self._validate_logit_bias()
        check_request(
            self.structured is None or isinstance(self.structured, StructuredOutput),
            "structured",
            "must be a StructuredOutput",
        )
        check_request(
            self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"must be in [0, {MAX_LOGPROBS}]",
        )

    def _validate_stops(self) -> None:
        check_request(
            len(self.stop) <= MAX_STOP_STRINGS, "stop", f"at most {MAX_STOP_STRINGS} stop strings"
        )
        for s in self.stop:
            check_request(
                isinstance(s, str) and len(s) > 0, "stop", "stop strings must be non-empty"
            )
            check_request(
                len(s) <= MAX_STOP_STRING_CHARS,
                "stop",
                f"a stop string is {len(s)} characters; at most {MAX_STOP_STRING_CHARS}",
            )
        check_request(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"at most {MAX_STOP_TOKEN_IDS} ids",
        )
        for t in self.stop_token_ids:
            check_request(_int(t) and t >= 0, "stop_token_ids", "ids must be >= 0")

    def _validate_logit_bias(self) -> None:
        check_request(
            len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
            "logit_bias",
            f"at most {MAX_LOGIT_BIAS_ENTRIES} entries",
        )
        for t, b in self.logit_bias:
            check_request(_int(t) and t >= 0, "logit_bias", f"token id {t!r} must be >= 0")
            check_request(
                _finite(b) and abs(b) <= MAX_LOGIT_BIAS,
                "logit_bias",
                f"bias {b!r} of token {t} must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
            )
        ids = [t for t, _ in self.logit_bias]
        check_request(len(set(ids)) == len(ids), "logit_bias", "a token id appears twice")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_vocab(self, vocab_size: int) -> None:
        """Checks that depend on the model: raise InvalidRequestError naming the field."""
        check_request(
            self.top_k <= vocab_size, "top_k", f"must be <= the vocabulary size {vocab_size}"
        )
        for t in self.stop_token_ids:
            check_request(
                t < vocab_size,
                "stop_token_ids",
                f"id {t} is outside the vocabulary [0, {vocab_size})",
            )
        for t, _ in self.logit_bias:
            check_request(
                t < vocab_size,
                "logit_bias",
                f"id {t} is outside the vocabulary [0, {vocab_size})",
            )
