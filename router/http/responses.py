"""Plain (not streamed) responses: every choice's pieces folded into OpenAI's JSON.

`ChatFold` builds a `chat.completion` (`message` with `content` and `tool_calls`, `logprobs`
with `content` entries), `CompletionFold` a `text_completion` (`text`, logprobs lists). Both
fold the same pieces a stream would carry (router/http/choices.py), so a plain and a streamed
response of one request agree, and `usage` comes from the flows' summaries.
"""

from __future__ import annotations

from typing import Any

from router.http.choices import ChatChoice, CompletionChoice, usage
from router.http.fanout import Event
from router.http.logprobs import TokenText, merge_completion
from router.http.requests import Prepared
from router.request import RequestSummary


class _Fold:
    def __init__(self, prepared: Prepared, model_name: str) -> None:
        self._prepared = prepared
        self._model_name = model_name
        self._summaries: dict[int, RequestSummary] = {}
        self._finish: dict[int, str | None] = {}

    def _record(self, event: Event) -> None:
        index, batch = event
        if batch.summary is not None:
            self._summaries[index] = batch.summary

    def _response(
        self, id_prefix: str, object_name: str, choices: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "id": f"{id_prefix}{self._prepared.request_id}",
            "object": object_name,
            "created": self._prepared.created,
            "model": self._model_name,
            "choices": choices,
            "usage": usage(self._prepared, self._summaries),
        }


class ChatFold(_Fold):
    def __init__(self, prepared: Prepared, model_name: str, texts: TokenText | None) -> None:
        super().__init__(prepared, model_name)
        num = len(prepared.choices)
        self._choices = [ChatChoice(k, prepared.tools, texts) for k in range(num)]
        self._content: list[list[str]] = [[] for _ in range(num)]
        self._calls: list[dict[int, dict[str, Any]]] = [{} for _ in range(num)]
        self._logprobs: list[list[dict[str, Any]] | None] = [
            None if texts is None else [] for _ in range(num)
        ]

    def on_event(self, event: Event) -> None:
        self._record(event)
        index, batch = event
        piece = self._choices[index].on_batch(batch)
        self._content[index].append(piece.content)
        for delta in piece.tool_calls:
            _merge_call(self._calls[index], delta)
        entries = self._logprobs[index]
        if entries is not None and piece.logprobs:
            entries.extend(piece.logprobs)
        if piece.finish_reason is not None:
            self._finish[index] = piece.finish_reason

    def response(self) -> dict[str, Any]:
        choices = []
        for k in range(len(self._choices)):
            calls = [self._calls[k][i] for i in sorted(self._calls[k])]
            content = "".join(self._content[k])
            message: dict[str, Any] = {
                "role": "assistant",
                # whitespace around calls is no content (router/http/hermes.py)
                "content": None if calls and not content.strip() else content,
            }
            if calls:
                message["tool_calls"] = calls
            entries = self._logprobs[k]
            choices.append(
                {
                    "index": k,
                    "message": message,
                    "logprobs": None if entries is None else {"content": entries},
                    "finish_reason": self._finish.get(k),
                }
            )
        return self._response("chatcmpl-", "chat.completion", choices)


def _merge_call(calls: dict[int, dict[str, Any]], delta: dict[str, Any]) -> None:
    """A streamed tool-call delta into the whole call: id and name once, arguments appended."""
    call = calls.setdefault(
        delta["index"], {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
    )
    if "id" in delta:
        call["id"] = delta["id"]
    function = delta.get("function", {})
    if "name" in function:
        call["function"]["name"] = function["name"]
    call["function"]["arguments"] += function.get("arguments", "")


class CompletionFold(_Fold):
    def __init__(
        self,
        prepared: Prepared,
        model_name: str,
        texts: TokenText | None,
        echoes: list[str] | None,
    ) -> None:
        super().__init__(prepared, model_name)
        self._choices = [
            CompletionChoice(k, None if echoes is None else echoes[p], texts)
            for k, p in enumerate(prepared.prompt_of)
        ]
        num = len(self._choices)
        self._text: list[list[str]] = [[] for _ in range(num)]
        self._logprobs: list[list[dict[str, Any]]] = [[] for _ in range(num)]
        self._with_logprobs = texts is not None

    def on_event(self, event: Event) -> None:
        self._record(event)
        index, batch = event
        piece = self._choices[index].on_batch(batch)
        self._text[index].append(piece.text)
        if piece.logprobs is not None:
            self._logprobs[index].append(piece.logprobs)
        if piece.finish_reason is not None:
            self._finish[index] = piece.finish_reason

    def response(self) -> dict[str, Any]:
        choices = [
            {
                "index": k,
                "text": "".join(self._text[k]),
                "logprobs": merge_completion(self._logprobs[k]) if self._with_logprobs else None,
                "finish_reason": self._finish.get(k),
            }
            for k in range(len(self._choices))
        ]
        return self._response("cmpl-", "text_completion", choices)
