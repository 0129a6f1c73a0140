"""A chat choice's batches -> OpenAI's chunks and message, tool calls included. Pure: the batches
are what the router's flow yields (`OutputBatch`es, the last with its summary); the bodies go
through the real `router.http.requests.chat` over the byte tokenizer."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router.config import RouterConfig
from router.http import requests, schemas
from router.http.errors import ApiError
from router.http.fanout import Event
from router.http.responses import ChatFold
from router.http.streaming import ChatChunks
from router.request import FinishReason, OutputBatch, RequestSummary
from router.stage_clock import StageTimings
from router.tokenizer import ByteTokenizer
from router.validation import ModelLimits


class HermesByteTokenizer(ByteTokenizer):
    """The byte tokenizer, claiming a chat template of the Hermes tool-call convention."""

    @property
    def chat_template(self) -> str | None:
        return "{{ messages }} {% if tools %}<tool_call>{{ tools }}</tool_call>{% endif %}"


MODEL = requests.Model(
    RouterConfig(max_model_len=4096, model_name="m"), HermesByteTokenizer(), ModelLimits(4096, 257)
)
PLAIN_MODEL = requests.Model(
    RouterConfig(max_model_len=4096, model_name="m"), ByteTokenizer(), ModelLimits(4096, 257)
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def prepared(model: requests.Model = MODEL, **fields: Any) -> requests.Prepared:
    body = schemas.ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "weather?"}], **fields}
    )
    return requests.chat(body, {}, model)


def events(text: str, cut: int, reason: FinishReason = FinishReason.STOP) -> list[Event]:
    """`text` as batches of `cut` characters (one token id per character), then the summary."""
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    batches = [OutputBatch("r", tuple(range(len(p))), p) for p in pieces[:-1]]
    summary = RequestSummary(reason, 10, len(text), 0, StageTimings(1.0, 0.1))
    last = pieces[-1] if pieces else ""
    batches.append(OutputBatch("r", tuple(range(len(last))), last, summary=summary))
    return [(0, b) for b in batches]


def streamed(p: requests.Prepared, evs: list[Event]) -> list[dict[str, Any]]:
    chunks = ChatChunks(p, "m", True, None)
    return [c for e in evs for c in chunks.on_event(e)] + chunks.end()


def folded(p: requests.Prepared, evs: list[Event]) -> dict[str, Any]:
    fold = ChatFold(p, "m", None)
    for e in evs:
        fold.on_event(e)
    return fold.response()


def calls_of(chunks: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(delta["index"], {"name": "", "arguments": "", "id": ""})
                call["id"] += delta.get("id", "")
                call["name"] += delta["function"].get("name", "")
                call["arguments"] += delta["function"].get("arguments", "")
    return calls


@pytest.mark.parametrize("cut", [1, 3, 7, 1000])
def test_auto_tool_calls_stream_and_fold_alike(cut: int) -> None:
    p = prepared(tools=[WEATHER])
    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    chunks = streamed(p, events(text, cut))
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert content == "Sure."
    [call] = calls_of(chunks).values()
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assert call["id"].startswith("call_")
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == len(text)
    message = folded(p, events(text, cut))["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] == "Sure."
    [whole] = message["message"]["tool_calls"]
    assert whole["type"] == "function" and whole["function"]["name"] == "get_weather"
    assert whole["function"]["arguments"] == call["arguments"]


def test_auto_leaves_text_alone_for_a_model_without_the_hermes_convention() -> None:
    p = prepared(PLAIN_MODEL, tools=[WEATHER])
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    message = folded(p, events(text, 5))["choices"][0]
    assert message["finish_reason"] == "stop" and message["message"]["content"] == text
    assert "tool_calls" not in message["message"]


def test_text_without_calls_stays_content_and_finishes_as_the_flow_says() -> None:
    p = prepared(tools=[WEATHER])
    response = folded(p, events("It is sunny.", 4, FinishReason.LENGTH))
    choice = response["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "length"


def test_forced_calls_come_whole_at_the_end() -> None:
    p = prepared(tools=[WEATHER], tool_choice="required")
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    chunks = streamed(p, events(text, 5))
    assert all(
        "content" not in c["choices"][0]["delta"] or not c["choices"][0]["delta"]["content"]
        for c in chunks[:-1]
    )
    [call] = calls_of(chunks).values()
    assert json.loads(call["arguments"]) == {"city": "Oslo"}
    choice = folded(p, events(text, 5))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None


def test_forced_output_cut_short_is_given_back_as_content() -> None:
    p = prepared(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}
    )
    choice = folded(p, events('{"city": "Os', 4, FinishReason.LENGTH))["choices"][0]
    assert choice["message"]["content"] == '{"city": "Os' and choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]


def test_a_forced_call_and_response_format_exclude_each_other() -> None:
    with pytest.raises(ApiError) as both:
        prepared(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    assert both.value.status == 400 and both.value.param == "tool_choice"
