"""Tokenization in the router: prompt text or chat messages -> token ids.

`HfTokenizer` loads a checkpoint's fast tokenizer (tokenizer.json + tokenizer_config.json, the
chat template included) through `transformers.PreTrainedTokenizerFast`. Hazard: it deliberately
avoids `AutoTokenizer`, whose import pulls in torch (transformers 5 imports
`modeling_rope_utils`), and the router must not import torch. Checkpoints that ship only a slow
(sentencepiece) tokenizer are therefore not supported by the router.

`ByteTokenizer` (UTF-8 bytes as ids) needs no files: tests and benchmarks use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.errors import InvalidRequestError


@dataclass(frozen=True)
class ChatTurn:
    """One chat message. `tool_calls`: an assistant turn's calls as OpenAI's plain dicts
    {"id", "type": "function", "function": {"name", "arguments": <JSON text>}}; `content` may
    be "" when the turn only calls tools. `tool_call_id`: the call a "tool" turn answers.
    `name`: the author's optional name."""

    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int: ...

    @property
    def chat_template(self) -> str | None:
        """The chat template's source (None: none); the HTTP front door reads its tool-call
        convention from it."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(
        self,
        turns: Sequence[ChatTurn],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Apply the chat template, with OpenAI-style `tools` (checked by the caller) when
        given. Raises InvalidRequestError('chat', ...) if there is none, if the template
        rejects the messages, or if a turn's tool call is not {"id", "function": {"name",
        "arguments"}}."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte; ids 256.. are specials (256 = EOS). Chat: "role: content\\n" lines;
    tools as one first line "tools: <JSON>", a tool call as "tool_call <id>: <name> <arguments>",
    a tool turn's header as "tool [<tool_call_id>]", a named author as "user (<name>)"."""

    EOS = 256

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def chat_template(self) -> str | None:
        return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (self.EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(
        self,
        turns: Sequence[ChatTurn],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        text = f"tools: {json.dumps(tools, separators=(',', ':'))}\n" if tools else ""
        text += "".join(_byte_turn(i, t) for i, t in enumerate(turns))
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode(errors="replace")


class HfTokenizer:
    """A Hugging Face fast tokenizer from a local checkpoint directory."""

    def __init__(self, model_path: str | Path) -> None:
        from transformers import PreTrainedTokenizerFast  # heavy: imported only when used

        self._tok: Any = PreTrainedTokenizerFast.from_pretrained(str(model_path))
        self._vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self._eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def chat_template(self) -> str | None:
        template = self._tok.chat_template
        return template if isinstance(template, str) else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True))

    def encode_chat(
        self,
        turns: Sequence[ChatTurn],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """See `Tokenizer`. Tool calls' arguments go to the template parsed (a dict), as most
        templates expect (`| tojson`); arguments that are not a JSON object stay text."""
        if not self._tok.chat_template:
            raise InvalidRequestError("chat", "the model has no chat template; send text instead")
        messages = [_hf_message(i, t) for i, t in enumerate(turns)]
        try:
            out = self._tok.apply_chat_template(
                messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        except Exception as exc:  # template errors (e.g. role order) come from user input
            raise InvalidRequestError(
                "chat", f"the chat template rejected the messages: {exc}"
            ) from exc
        return list(out)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(token_ids), skip_special_tokens=True))


def _call_parts(i: int, j: int, call: dict[str, Any]) -> tuple[str, str, str]:
    """(id, name, arguments text) of turn i's call j; InvalidRequestError("chat") if malformed."""
    function = call.get("function") if isinstance(call, dict) else None
    ok = isinstance(function, dict) and all(
        isinstance(x, str)
        for x in (call.get("id"), function.get("name"), function.get("arguments"))
    )
    if not ok:
        raise InvalidRequestError(
            "chat",
            f'messages[{i}].tool_calls[{j}] must be {{"id", "type": "function", "function": '
            '{"name", "arguments"}} with string values',
        )
    assert isinstance(function, dict)
    return call["id"], function["name"], function["arguments"]


def _byte_turn(i: int, turn: ChatTurn) -> str:
    header = turn.role
    if turn.name is not None:
        header += f" ({turn.name})"
    if turn.tool_call_id is not None:
        header += f" [{turn.tool_call_id}]"
    text = f"{header}: {turn.content}\n"
    for j, call in enumerate(turn.tool_calls):
        call_id, name, arguments = _call_parts(i, j, call)
        text += f"tool_call {call_id}: {name} {arguments}\n"
    return text


def _hf_message(i: int, turn: ChatTurn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [_hf_tool_call(i, j, c) for j, c in enumerate(turn.tool_calls)]
    if turn.tool_call_id is not None:
        message["tool_call_id"] = turn.tool_call_id
    if turn.name is not None:
        message["name"] = turn.name
    return message


def _hf_tool_call(i: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    call_id, name, arguments = _call_parts(i, j, call)
    try:
        parsed: Any = json.loads(arguments)
    except ValueError:
        parsed = None
    # a call streamed with its arguments cut short comes back as history: keep its text
    args = parsed if isinstance(parsed, dict) else arguments
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
