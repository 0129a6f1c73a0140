"""One choice of a response, batch by batch: the flow's `OutputBatch`es -> OpenAI's pieces.

`ChatChoice.on_batch` gives a `ChatPiece` (content and tool-call deltas, logprobs entries, the
finish reason on the last); `CompletionChoice.on_batch` a `CompletionPiece` (text, logprobs
lists, finish reason; the echoed prompt before the first text). Streaming writes each piece as a
chunk (router/http/streaming.py); a plain response folds them (router/http/responses.py), so
both carry the same text, tokens and counts. `usage` sums a response's summaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.http.chat_tools import ToolSetup, ToolStream
from router.http.logprobs import CompletionLogprobs, TokenText, chat_content
from router.http.requests import Prepared
from router.request import FinishReason, OutputBatch, RequestSummary

FINISH_NAMES = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
}


def finish_name(summary: RequestSummary | None) -> str | None:
    """OpenAI's finish_reason of a final batch's summary (None for other batches). "abort"
    (vLLM's word) is a request ended by the Abort call; a reason the router does not know is
    reported as "stop"."""
    if summary is None:
        return None
    reason = summary.finish_reason
    return "stop" if reason is None else FINISH_NAMES[reason]


@dataclass(frozen=True)
class ChatPiece:
    index: int
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None  # `logprobs.content` entries, when asked for
    finish_reason: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.content or self.tool_calls or self.logprobs or self.finish_reason)


class ChatChoice:
    """A chat choice: text through its `ToolStream` (tools), tokens' logprobs when asked for."""

    def __init__(self, index: int, tools: ToolSetup, texts: TokenText | None) -> None:
        self.index = index
        self._stream = ToolStream(tools)
        self._texts = texts

    def on_batch(self, batch: OutputBatch) -> ChatPiece:
        deltas = self._stream.feed(batch.text_delta)
        if batch.is_final:
            deltas += self._stream.finish()
        finish = finish_name(batch.summary)
        if finish is not None and self._stream.called:
            finish = "tool_calls"
        logprobs = None
        if self._texts is not None:
            logprobs = chat_content(batch.token_ids, batch.logprobs, self._texts)
        return ChatPiece(
            self.index,
            "".join(d.content for d in deltas if d.content),
            [d.tool_call for d in deltas if d.tool_call is not None],
            logprobs,
            finish,
        )


@dataclass(frozen=True)
class CompletionPiece:
    index: int
    text: str = ""
    logprobs: dict[str, Any] | None = None  # the lists of this piece's tokens, when asked for
    finish_reason: str | None = None


class CompletionChoice:
    """A completion choice; `echo` (the prompt's text) comes before the first text."""

    def __init__(self, index: int, echo: str | None, texts: TokenText | None) -> None:
        self.index = index
        self._echo = echo or ""
        self._logprobs = None if texts is None else CompletionLogprobs(texts, len(self._echo))

    def on_batch(self, batch: OutputBatch) -> CompletionPiece:
        text, self._echo = self._echo + batch.text_delta, ""
        logprobs = None
        if self._logprobs is not None:
            logprobs = self._logprobs.part(batch.token_ids, batch.logprobs)
        return CompletionPiece(self.index, text, logprobs, finish_name(batch.summary))


def usage(prepared: Prepared, summaries: Mapping[int, RequestSummary]) -> dict[str, Any]:
    """OpenAI's usage of a response: each prompt counted once (n choices share it), every
    choice's completion tokens; cached tokens: per prompt, the most any of its choices had."""
    prompt_tokens = sum(len(p) for p in prepared.prompts)
    completion_tokens = sum(s.num_completion_tokens for s in summaries.values())
    cached = [0] * len(prepared.prompts)
    for k, s in summaries.items():
        p = prepared.prompt_of[k]
        cached[p] = max(cached[p], s.num_cached_prompt_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(cached)},
    }
