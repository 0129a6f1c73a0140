"""Tool calls in the Hermes convention (Qwen2/Qwen3 chat templates), streamed or whole.

The model writes `<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>`, possibly
several times, possibly after some text. `HermesToolParser` turns the streamed text into
`ParserEvent`s: content for the text outside calls, and per call a head (index, id, name) and
argument pieces as soon as they are known.

Contract (what the tests check, for every way of cutting the text into deltas):
- Content events concatenate to the text outside well-formed calls. A possible prefix of
  `<tool_call>` at the end of a delta is held back until decided (`finish` releases it).
  Whitespace between or around calls is content too: the caller may treat whitespace-only
  content as none.
- A call's arguments are streamed in canonical form (`tool_call.dump_arguments`: compact,
  json.dumps-normalized; see `json_stream` for the three corner cases where it is not exactly
  json.dumps): argument pieces concatenate to the same text `parse_all` returns.
- The body is scanned as JSON, so `</tool_call>` inside a JSON string does not end the call.
  After the object: whitespace then `</tool_call>` is consumed; anything else (or the end of
  the stream) also ends the call, and what follows is content again.
- A call is announced (its head event) once its name string is complete and its "arguments"
  value has begun as an object (or, when "arguments" comes first, once the name is complete).
- Malformed calls (not JSON, no string "name", "arguments" not an object, a duplicate "name" or
  "arguments" key, a name outside `tool_names`, cut off by the end of the stream) become
  content: the raw text from `<tool_call>` up to the offending character, which is then read
  as ordinary text. Hazard: a call whose JSON breaks *after* its head was streamed (a syntax
  error inside the arguments, or the stream ending mid-arguments) cannot be taken back: the
  stream keeps that call with its arguments cut short (not valid JSON; OpenAI warns clients of
  the same), its raw text follows as content, and its index is listed in `broken_indices`;
  `parse_all` drops such a call (its text is in the content either way), so the content always
  agrees and the calls agree except for those.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum, auto

from router.http.json_stream import JsonStream, JsonSyntaxError, MemberEvent
from router.http.tool_call import ParserEvent, ToolCall, new_call_id

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_WHITESPACE = " \t\n\r"


def supports_hermes(chat_template: str | None) -> bool:
    """Whether a chat template writes tool calls the Hermes way (it mentions `<tool_call>`)."""
    return chat_template is not None and TOOL_CALL_OPEN in chat_template


class _MalformedCall(Exception):
    """The call being scanned is valid JSON so far but not a valid call."""


class _Mode(Enum):
    TEXT = auto()  # outside calls, looking for "<tool_call>"
    CALL = auto()  # scanning a call's JSON object
    TAIL = auto()  # the object closed: whitespace and "</tool_call>" may follow


@dataclass
class _Call:
    """The call being scanned. `args` holds canonical argument pieces; `num_sent` how many of
    them have gone out; `index`/`call_id` are set when the head goes out."""

    raw: list[str] = field(default_factory=lambda: [TOOL_CALL_OPEN])
    scanner: JsonStream = field(default_factory=JsonStream)
    keys: set[str] = field(default_factory=set)
    name: str | None = None
    args_open: bool = False
    args_done: bool = False
    args: list[str] = field(default_factory=list)
    num_sent: int = 0
    index: int | None = None
    call_id: str | None = None


class _Events:
    """Collects events, merging adjacent content and adjacent argument pieces of one call."""

    def __init__(self) -> None:
        self.events: list[ParserEvent] = []

    def content(self, text: str) -> None:
        if not text:
            return
        last = self.events[-1] if self.events else None
        if last is not None and last.content is not None:
            self.events[-1] = ParserEvent(content=last.content + text)
        else:
            self.events.append(ParserEvent(content=text))

    def head(self, index: int, call_id: str, name: str) -> None:
        self.events.append(ParserEvent(index=index, id=call_id, name=name))

    def arguments(self, index: int, text: str) -> None:
        if not text:
            return
        last = self.events[-1] if self.events else None
        if last is not None and last.index == index and last.arguments is not None:
            self.events[-1] = ParserEvent(index=index, arguments=last.arguments + text)
        else:
            self.events.append(ParserEvent(index=index, arguments=text))


class HermesToolParser:
    """Streams tool calls out of Hermes-style model text; see the module docstring.

    `tool_names`: when given, a call naming another function is malformed (becomes content).
    One parser per generated sequence: `feed` each text delta in order, then `finish` once.
    """

    def __init__(self, tool_names: Collection[str] | None = None) -> None:
        self._tool_names = None if tool_names is None else frozenset(tool_names)
        self._mode = _Mode.TEXT
        # undecided text: in TEXT a possible "<tool_call>" prefix, in TAIL whitespace and a
        # possible "</tool_call>" prefix
        self._pending = ""
        self._call: _Call | None = None
        self._num_heads = 0
        self._broken: list[int] = []

    @property
    def broken_indices(self) -> tuple[int, ...]:
        """Indices of streamed calls whose JSON broke after their head went out (see module)."""
        return tuple(self._broken)

    def feed(self, delta: str) -> list[ParserEvent]:
        """Consumes one text delta (cut anywhere); returns the events it decided."""
        out = _Events()
        text, self._pending = self._pending + delta, ""
        i = 0
        while i < len(text):
            if self._mode is _Mode.TEXT:
                i = self._scan_text(text, i, out)
            elif self._mode is _Mode.CALL:
                i = self._scan_call(text, i, out)
            else:
                i = self._scan_tail(text, i)
        return out.events

    def finish(self) -> list[ParserEvent]:
        """Ends the stream: releases held-back text; an unfinished call becomes content."""
        out = _Events()
        if self._mode is _Mode.TEXT:
            out.content(self._pending)
        elif self._mode is _Mode.CALL:
            self._break_call(out)
        self._mode, self._pending = _Mode.TEXT, ""
        return out.events

    def parse_all(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole (non-streamed) output -> (content, well-formed calls), exactly what streaming
        it would give minus `broken_indices`. Uses a fresh parser; this one is untouched."""
        parser = HermesToolParser(self._tool_names)
        events = parser.feed(text) + parser.finish()
        content = "".join(e.content for e in events if e.content is not None)
        return content, _collect_calls(events, set(parser.broken_indices))

    # -------------------------------------------------------------- the three modes

    def _scan_text(self, text: str, i: int, out: _Events) -> int:
        start = text.find(TOOL_CALL_OPEN, i)
        if start >= 0:
            out.content(text[i:start])
            self._mode, self._call = _Mode.CALL, _Call()
            return start + len(TOOL_CALL_OPEN)
        held = _held_prefix_start(text, i, TOOL_CALL_OPEN)
        out.content(text[i:held])
        self._pending = text[held:]
        return len(text)

    def _scan_call(self, text: str, i: int, out: _Events) -> int:
        call = self._call
        assert call is not None
        for j in range(i, len(text)):
            c = text[j]
            try:
                self._route(call, c, call.scanner.push(c), out)
                if call.scanner.done:
                    self._complete_call(call, out)
            except (JsonSyntaxError, _MalformedCall):
                self._break_call(out)
                return j  # the offending character is read again as text
            call.raw.append(c)
            if call.scanner.done:
                self._mode, self._call = _Mode.TAIL, None
                return j + 1
        return len(text)

    def _scan_tail(self, text: str, i: int) -> int:
        j = i
        while j < len(text) and text[j] in _WHITESPACE:
            j += 1
        rest = text[j : j + len(TOOL_CALL_CLOSE)]
        if rest == TOOL_CALL_CLOSE:
            self._mode = _Mode.TEXT
            return j + len(TOOL_CALL_CLOSE)
        if TOOL_CALL_CLOSE.startswith(rest) and j + len(rest) == len(text):
            self._pending = text[i:]  # undecided: wait for more (dropped by finish)
            return len(text)
        self._mode = _Mode.TEXT  # no close tag: the call is over, this is content
        return i

    # -------------------------------------------------------------- one call

    def _route(self, call: _Call, c: str, piece: str, out: _Events) -> None:
        """Applies one scanned character of the call's JSON: checks the envelope, collects the
        arguments' canonical text, sends what became known."""
        member = call.scanner.member
        if member is not None:
            self._check_member(call, c, member)
        if call.args_open:
            call.args.append(piece)
        if member is not None and member.kind == "end" and member.key == "arguments":
            call.args_open, call.args_done = False, True
        self._send(call, out)

    def _check_member(self, call: _Call, c: str, member: MemberEvent) -> None:
        if member.kind == "key" and member.key in ("name", "arguments"):
            if member.key in call.keys:
                raise _MalformedCall(f"duplicate {member.key!r}")
            call.keys.add(member.key)
        elif member.kind == "start" and member.key == "arguments":
            if c != "{":
                raise _MalformedCall("arguments must be a JSON object")
            call.args_open = True
        elif member.kind == "end" and member.key == "name":
            name = member.text
            if not name or (self._tool_names is not None and name not in self._tool_names):
                raise _MalformedCall(f"bad function name {name!r}")
            call.name = name

    def _send(self, call: _Call, out: _Events) -> None:
        if call.call_id is None:
            if call.name is None or not (call.args_open or call.args_done):
                return
            call.index, call.call_id = self._num_heads, new_call_id()
            self._num_heads += 1
            out.head(call.index, call.call_id, call.name)
        assert call.index is not None
        if call.num_sent < len(call.args):
            out.arguments(call.index, "".join(call.args[call.num_sent :]))
            call.num_sent = len(call.args)

    def _complete_call(self, call: _Call, out: _Events) -> None:
        """The object closed: a call needs a name; no "arguments" means `{}`."""
        if call.name is None:
            raise _MalformedCall("no function name")
        if not call.args_done:
            call.args, call.args_done = ["{}"], True
            self._send(call, out)

    def _break_call(self, out: _Events) -> None:
        call = self._call
        assert call is not None
        out.content("".join(call.raw))
        if call.index is not None:
            self._broken.append(call.index)
        self._mode, self._call = _Mode.TEXT, None


def _held_prefix_start(text: str, i: int, tag: str) -> int:
    """Where the longest suffix of text[i:] that is a proper prefix of `tag` starts."""
    for n in range(min(len(tag) - 1, len(text) - i), 0, -1):
        if text.endswith(tag[:n]):
            return len(text) - n
    return len(text)


def _collect_calls(events: list[ParserEvent], skip: set[int]) -> list[ToolCall]:
    heads: dict[int, tuple[str, str]] = {}
    arguments: dict[int, list[str]] = {}
    for event in events:
        if event.index is None or event.index in skip:
            continue
        if event.id is not None and event.name is not None:
            heads[event.index] = (event.id, event.name)
        if event.arguments is not None:
            arguments.setdefault(event.index, []).append(event.arguments)
    return [
        ToolCall(call_id, name, "".join(arguments.get(index, [])))
        for index, (call_id, name) in sorted(heads.items())
    ]
