"""Log-probabilities in OpenAI's two shapes, from the flow's `TokenLogprobs`.

Chat (`choices[].logprobs.content[]`): one entry per token, `{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}`. Completions (`choices[].logprobs`): parallel lists
`tokens`, `token_logprobs`, `top_logprobs` (one {token: logprob} dict per token) and
`text_offset` (each token's character offset in the choice's text).

A token's text is the tokenizer's decoding of that one id (`TokenText`, cached per id). Hazard:
a token that holds part of a multi-byte character decodes to U+FFFD, and its `bytes` are those
of U+FFFD, not the raw byte; special tokens decode to "" (the tokenizer skips them). A logprob
of -inf (a token ruled out by a grammar or a -100 bias, among the top alternatives) is written
as MIN_LOGPROB: JSON has no infinity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from engine.scheduler.output import TokenLogprobs
from router.tokenizer import Tokenizer

MAX_CACHED_TOKENS = 1 << 18
MIN_LOGPROB = -9999.0  # stands for -inf (a token a grammar or a ban ruled out): JSON has no inf


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class TokenText:
    """Each token id's text, decoded once (bounded by the vocabulary, and MAX_CACHED_TOKENS)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id])
            if len(self._texts) < MAX_CACHED_TOKENS:
                self._texts[token_id] = text
        return text


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_content(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], texts: TokenText
) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries for `token_ids` (paired with `logprobs`)."""
    return [
        {
            **_entry(texts(t), lp.logprob),
            "top_logprobs": [_entry(texts(i), v) for i, v in lp.top],
        }
        for t, lp in zip(token_ids, logprobs)
    ]


class CompletionLogprobs:
    """Completions' logprobs of one choice, grown batch by batch; `text_offset` continues from
    the text before (the echoed prompt, then each token)."""

    def __init__(self, texts: TokenText, offset: int = 0) -> None:
        self._texts = texts
        self._offset = offset

    def part(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]) -> dict[str, Any]:
        """The lists for these tokens (a streamed chunk's, or a slice of the whole)."""
        out: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for t, lp in zip(token_ids, logprobs):
            text = self._texts(t)
            out["tokens"].append(text)
            out["token_logprobs"].append(finite(lp.logprob))
            out["top_logprobs"].append({self._texts(i): finite(v) for i, v in lp.top})
            out["text_offset"].append(self._offset)
            self._offset += len(text)
        return out


def merge_completion(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Streamed parts of completions' logprobs as one."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: [v for part in parts for v in part[k]] for k in keys}
