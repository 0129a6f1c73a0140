"""Streamed responses: server-sent events in OpenAI's chunk format.

`ChatChunks` / `CompletionChunks` turn each `(choice index, OutputBatch)` into chunks
(`chat.completion.chunk` with a `delta`, or `text_completion`); `end()` adds, with
`stream_options.include_usage`, a last chunk with empty `choices` and the `usage` (every other
chunk then carries `"usage": null`, as OpenAI's do). `sse_stream` writes them as `data: {json}`
events and `data: [DONE]` at the end. A failure after the stream started is one event
`data: {"error": {...}}` (OpenAI's error object), and the stream ends without [DONE].

`ClosingStreamingResponse` closes the event generator when the response ends for any reason:
starlette cancels the streaming task when the client disconnects, and the cancel may land in a
socket write rather than in the generator; closing it then runs the flows' `aclosing` exits at
once, which aborts the requests on their workers (router/http/fanout.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from router.errors import RequestError
from router.http.choices import ChatChoice, CompletionChoice, usage
from router.http.errors import ApiError
from router.http.fanout import Event
from router.http.logprobs import TokenText
from router.http.requests import Prepared
from router.request import RequestSummary

DONE = "data: [DONE]\n\n"
MEDIA_TYPE = "text/event-stream"


def sse(data: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


class Chunks:
    """What both chunk formats share: the head of every chunk, the summaries, the usage."""

    object_name = ""
    id_prefix = ""

    def __init__(self, prepared: Prepared, model_name: str, include_usage: bool) -> None:
        self._prepared = prepared
        self._include_usage = include_usage
        self._summaries: dict[int, RequestSummary] = {}
        self._head: dict[str, Any] = {
            "id": f"{self.id_prefix}{prepared.request_id}",
            "object": self.object_name,
            "created": prepared.created,
            "model": model_name,
        }

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk = {**self._head, "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _record(self, event: Event) -> None:
        index, batch = event
        if batch.summary is not None:
            self._summaries[index] = batch.summary

    def on_event(self, event: Event) -> list[dict[str, Any]]:
        raise NotImplementedError

    def end(self) -> list[dict[str, Any]]:
        """The usage chunk, when asked for."""
        if not self._include_usage:
            return []
        return [{**self._head, "choices": [], "usage": usage(self._prepared, self._summaries)}]


class ChatChunks(Chunks):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(
        self, prepared: Prepared, model_name: str, include_usage: bool, texts: TokenText | None
    ) -> None:
        super().__init__(prepared, model_name, include_usage)
        self._choices = [ChatChoice(k, prepared.tools, texts) for k in range(len(prepared.choices))]
        self._started: set[int] = set()

    def on_event(self, event: Event) -> list[dict[str, Any]]:
        self._record(event)
        index, batch = event
        piece = self._choices[index].on_batch(batch)
        if piece.empty:
            return []
        delta: dict[str, Any] = {}
        if index not in self._started:  # the role goes on a choice's first chunk
            self._started.add(index)
            delta = {"role": "assistant", "content": ""}
        if piece.content:
            delta["content"] = piece.content
        if piece.tool_calls:
            delta["tool_calls"] = piece.tool_calls
        logprobs = None if piece.logprobs is None else {"content": piece.logprobs}
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": piece.finish_reason,
        }
        return [self._chunk(choice)]


class CompletionChunks(Chunks):
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(
        self,
        prepared: Prepared,
        model_name: str,
        include_usage: bool,
        texts: TokenText | None,
        echoes: list[str] | None,
    ) -> None:
        super().__init__(prepared, model_name, include_usage)
        self._choices = [
            CompletionChoice(k, None if echoes is None else echoes[p], texts)
            for k, p in enumerate(prepared.prompt_of)
        ]

    def on_event(self, event: Event) -> list[dict[str, Any]]:
        self._record(event)
        index, batch = event
        piece = self._choices[index].on_batch(batch)
        if not (piece.text or piece.finish_reason or (piece.logprobs or {}).get("tokens")):
            return []
        choice = {
            "index": index,
            "text": piece.text,
            "logprobs": piece.logprobs,
            "finish_reason": piece.finish_reason,
        }
        return [self._chunk(choice)]


async def sse_stream(
    events: AsyncGenerator[Event, None],
    first: Iterable[Event],
    chunks: Chunks,
    renames: Mapping[str, str],
) -> AsyncIterator[str]:
    """The events (`first` already taken from `events`) as SSE; the error event on a failure."""
    try:
        async with aclosing(events):
            for event in first:
                for chunk in chunks.on_event(event):
                    yield sse(chunk)
            async for event in events:
                for chunk in chunks.on_event(event):
                    yield sse(chunk)
    except RequestError as exc:
        yield sse(ApiError.from_request_error(exc, renames).body())
        return
    for chunk in chunks.end():
        yield sse(chunk)
    yield DONE


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its async generator however the response ends."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
