"""Chat messages and tools: the prompt (`Tokenizer.encode_chat` with the tools) and, per choice,
the model's text turned into content and tool-call deltas (`ToolStream`).

`tool_choice` decides the mode (`tool_setup`):
- no tools, or "none": plain text (NONE);
- tools with "auto" (or no tool_choice) for a model whose chat template follows the Hermes
  convention (`<tool_call>` blocks: Qwen2, Qwen3; `router.http.tools.supports_hermes`): the text
  streams through `router.http.tools.HermesToolParser`, which splits content from `<tool_call>`
  blocks (AUTO); for other models the tools reach the template and the text stays text;
- "required" or {"type": "function", "function": {"name": ...}}: the output is constrained to
  the JSON schema `router.http.tools.forced_tool_schema` gives (`tool_structured`), and the whole
  text is parsed into calls at the end (`parse_forced_calls`; FORCED). Output that does not parse
  (cut short by max_tokens) is returned as content.
A response with tool calls ends with finish_reason "tool_calls".

`router.http.tools` (checks, the parser and the schemas; it loads jsonschema) is imported only
when a body has tools.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import check_request
from engine.sampling_params import StructuredOutput
from router.http import schemas
from router.tokenizer import ChatTurn, Tokenizer
from router.validation import MAX_CHAT_MESSAGES


class ToolMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    FORCED = "forced"


@dataclass(frozen=True)
class ToolSetup:
    """A body's tools (as plain dicts, OpenAI's shape) and how calls are made."""

    mode: ToolMode = ToolMode.NONE
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: object = None


def chat_turns(messages: Sequence[schemas.ChatMessage]) -> list[ChatTurn]:
    check_request(
        len(messages) <= MAX_CHAT_MESSAGES, "messages", f"at most {MAX_CHAT_MESSAGES} messages"
    )
    turns = []
    for m in messages:
        extras: dict[str, Any] = {}
        if m.tool_calls is not None:
            extras["tool_calls"] = tuple(m.tool_calls)
        if m.tool_call_id is not None:
            extras["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            extras["name"] = m.name
        turns.append(ChatTurn(m.role, m.text(), **extras))
    return turns


def encode_chat(
    tokenizer: Tokenizer,
    turns: list[ChatTurn],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The chat template over `turns`, with `tools` when there are any."""
    if not tools:
        return tokenizer.encode_chat(turns, add_generation_prompt)
    return tokenizer.encode_chat(turns, add_generation_prompt, tools=tools)


def tool_setup(body: schemas.ChatCompletionRequest, chat_template: str | None) -> ToolSetup:
    """The mode of the body's `tool_choice` for a model with `chat_template`; raises
    InvalidRequestError naming `tools` or `tool_choice` (`router.http.tools.check_tools`)."""
    choice = body.tool_choice
    if not body.tools and choice in (None, "none"):
        return ToolSetup()
    from router.http import tools as tool_calls

    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    tool_calls.check_tools(tools or None, choice)
    if not tools or choice == "none":
        return ToolSetup(ToolMode.NONE, tools, choice)
    if choice is None or choice == "auto":
        hermes = tool_calls.supports_hermes(chat_template)
        return ToolSetup(ToolMode.AUTO if hermes else ToolMode.NONE, tools, "auto")
    return ToolSetup(ToolMode.FORCED, tools, choice)


def tool_structured(setup: ToolSetup) -> StructuredOutput | None:
    """The JSON schema a forced tool call constrains the output to; None otherwise."""
    if setup.mode is not ToolMode.FORCED:
        return None
    from router.http import tools

    schema = tools.forced_tool_schema(setup.tools, setup.tool_choice)
    return None if schema is None else StructuredOutput("json_schema", schema)


@dataclass(frozen=True)
class Delta:
    """One piece of a choice's message: content, or a tool-call delta in OpenAI's shape."""

    content: str | None = None
    tool_call: dict[str, Any] | None = None


class ToolStream:
    """One choice's text -> `Delta`s, by its `ToolSetup`'s mode (module docstring)."""

    def __init__(self, setup: ToolSetup) -> None:
        self._setup = setup
        self._buffer: list[str] = []
        self._parser: Any = None
        self.called = False  # a tool call was emitted: finish_reason "tool_calls"
        if setup.mode is ToolMode.AUTO:
            from router.http import tools

            self._parser = tools.HermesToolParser([t["function"]["name"] for t in setup.tools])

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self._setup.mode is ToolMode.NONE:
            return [Delta(content=text)]
        if self._setup.mode is ToolMode.FORCED:
            self._buffer.append(text)
            return []
        return self._deltas(self._parser.feed(text))

    def finish(self) -> list[Delta]:
        if self._setup.mode is ToolMode.AUTO:
            return self._deltas(self._parser.finish())
        if self._setup.mode is ToolMode.FORCED:
            return self._forced_calls("".join(self._buffer))
        return []

    def _forced_calls(self, text: str) -> list[Delta]:
        from router.http import tools

        try:
            calls = tools.parse_forced_calls(text, self._setup.tools, self._setup.tool_choice)
        except ValueError:  # the output is not the calls (e.g. cut short): give it as text
            return [Delta(content=text)] if text else []
        self.called = self.called or bool(calls)
        return [
            Delta(tool_call=_call_delta(i, c.id, c.name, c.arguments)) for i, c in enumerate(calls)
        ]

    def _deltas(self, events: list[Any]) -> list[Delta]:
        out = []
        for e in events:
            if e.index is None:
                if e.content:
                    out.append(Delta(content=e.content))
                continue
            self.called = True
            out.append(Delta(tool_call=_call_delta(e.index, e.id, e.name, e.arguments)))
        return out


def _call_delta(
    index: int, call_id: str | None, name: str | None, arguments: str | None
) -> dict[str, Any]:
    """A tool-call delta as OpenAI streams it: id, type and name on a call's first delta."""
    delta: dict[str, Any] = {"index": index}
    function: dict[str, str] = {}
    if call_id is not None:
        delta |= {"id": call_id, "type": "function"}
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    delta["function"] = function
    return delta
