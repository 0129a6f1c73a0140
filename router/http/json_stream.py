"""An incremental, strict JSON scanner that re-serializes one object as it reads it.

`JsonStream.push(c)` takes the text of one JSON object a character at a time and returns the
canonical text that character finalized, so the concatenation of the returns is a prefix of the
canonical text that later characters never change; once `done`, it is the whole of it.

Canonical form is `json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)`
(what `tool_call.dump_arguments` writes), with these documented differences:
- duplicate keys are kept in order (json.loads keeps only the last);
- lone surrogate escapes are written as `\\uXXXX` (as `dump_arguments` does);
- a number too large for a float (`1e400`) is kept as written (json.dumps would write
  `Infinity`, which is not JSON).
Strict means RFC 8259: no NaN/Infinity, no raw control characters in strings, no leading zeros,
no trailing commas. A number or literal is finalized by the character after it, so its text
comes out with that character; an object always ends with `}`, so nothing stays pending then.

For the members of the top-level object only, `member` tells the caller where they are: after a
push it holds the `MemberEvent` that character caused (a key completed, a value began, a value
ended), or None.
"""

from __future__ import annotations

import math
import re
from enum import Enum, auto
from typing import Literal, NamedTuple

_WHITESPACE = frozenset(" \t\n\r")
_SIMPLE_ESCAPES = {
    '"': '"',
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_ESCAPED_OUTPUT = {chr(i): f"\\u{i:04x}" for i in range(0x20)} | {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_TOKEN_START = frozenset("-0123456789tfn")
_TOKEN_CHARS = frozenset("0123456789+-.eEtrufalsn")
_LITERALS = frozenset({"true", "false", "null"})
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


class JsonSyntaxError(ValueError):
    """The text is not (a prefix of) one JSON object."""


class MemberEvent(NamedTuple):
    """A step in a member of the top-level object. `kind`: "key" (its key string closed),
    "start" (its value's first character), "end" (its value's last character, or for a number
    or literal the character after it). `text`: the decoded key for "key", the decoded string
    for "end" of a string value, else None."""

    kind: Literal["key", "start", "end"]
    key: str
    text: str | None


class _Expect(Enum):
    VALUE = auto()  # a value (or, at the very start, the top-level "{")
    FIRST_KEY = auto()  # after "{": a key or "}"
    KEY = auto()  # after "," in an object
    COLON = auto()
    FIRST_ITEM = auto()  # after "[": a value or "]"
    NEXT = auto()  # after a value: "," or the container's closing bracket
    DONE = auto()  # the top-level object closed


class JsonStream:
    """Scans one JSON object; see the module docstring. Not reusable: one object per instance.
    `push` raises JsonSyntaxError at the first character that cannot continue a JSON object,
    and must not be called again after that."""

    def __init__(self) -> None:
        self.member: MemberEvent | None = None
        self._stack: list[str] = []  # "{" or "[" per open container
        self._expect = _Expect.VALUE
        self._key = ""  # the current key of the top-level object
        self._token: list[str] | None = None  # a number or literal being read
        self._in_string = False
        self._is_key = False
        self._decoded: list[str] | None = None  # decoded text of a top-level member's string
        self._escape: str | None = None  # after a backslash: "" or "u" plus hex digits
        self._high_surrogate: int | None = None  # a \uD800-\uDBFF waiting for its pair

    @property
    def done(self) -> bool:
        return self._expect is _Expect.DONE

    def push(self, c: str) -> str:
        """Consumes one character; returns the canonical text it finalized (often "")."""
        self.member = None
        if self._in_string:
            return self._string_char(c)
        if self._token is not None:
            if c in _TOKEN_CHARS:
                self._token.append(c)
                return ""
            head = self._end_token()
            return head + self._structural(c)
        return self._structural(c)

    # -------------------------------------------------------------- structure

    def _structural(self, c: str) -> str:
        if c in _WHITESPACE:
            return ""
        expect = self._expect
        if expect is _Expect.VALUE or (expect is _Expect.FIRST_ITEM and c != "]"):
            return self._begin_value(c)
        if (expect is _Expect.FIRST_KEY and c == "}") or expect is _Expect.FIRST_ITEM:
            return self._close(c)  # FIRST_ITEM here means c == "]"
        if expect in (_Expect.FIRST_KEY, _Expect.KEY) and c == '"':
            self._open_string(is_key=True)
            return '"'
        if expect is _Expect.COLON and c == ":":
            self._expect = _Expect.VALUE
            return ":"
        if expect is _Expect.NEXT and c == ",":
            self._expect = _Expect.KEY if self._stack[-1] == "{" else _Expect.VALUE
            return ","
        if expect is _Expect.NEXT and c in "}]":
            return self._close(c)
        raise JsonSyntaxError(f"unexpected {c!r}")

    def _begin_value(self, c: str) -> str:
        if not self._stack and c != "{":
            raise JsonSyntaxError(f"expected a JSON object, got {c!r}")
        if self._in_top_object():
            self._set_member("start", None)
        if c in "{[":
            self._stack.append(c)
            self._expect = _Expect.FIRST_KEY if c == "{" else _Expect.FIRST_ITEM
            return c
        if c == '"':
            self._open_string(is_key=False)
            return '"'
        if c in _TOKEN_START:
            self._token = [c]
            return ""
        raise JsonSyntaxError(f"unexpected {c!r} where a value should start")

    def _close(self, c: str) -> str:
        if self._stack.pop() != ("{" if c == "}" else "["):
            raise JsonSyntaxError(f"mismatched {c!r}")
        self._value_done(None)
        return c

    def _value_done(self, decoded: str | None) -> None:
        if not self._stack:
            self._expect = _Expect.DONE
            return
        self._expect = _Expect.NEXT
        if self._in_top_object():
            self._set_member("end", decoded)

    def _in_top_object(self) -> bool:
        return len(self._stack) == 1 and self._stack[0] == "{"

    def _set_member(self, kind: Literal["key", "start", "end"], text: str | None) -> None:
        assert self.member is None, "one member event per character"
        self.member = MemberEvent(kind, self._key, text)

    # -------------------------------------------------------------- numbers and literals

    def _end_token(self) -> str:
        assert self._token is not None
        token = "".join(self._token)
        self._token = None
        if token in _LITERALS:
            out = token
        elif _NUMBER.fullmatch(token):
            out = _canonical_number(token)
        else:
            raise JsonSyntaxError(f"{token!r} is not a JSON number or literal")
        self._value_done(None)
        return out

    # -------------------------------------------------------------- strings

    def _open_string(self, is_key: bool) -> None:
        self._in_string = True
        self._is_key = is_key
        self._decoded = [] if self._in_top_object() else None

    def _string_char(self, c: str) -> str:
        if self._escape is not None:
            return self._escape_char(c)
        if c == '"':
            return self._flush_high_surrogate() + self._close_string()
        if c == "\\":
            self._escape = ""
            return ""
        if c < " ":
            raise JsonSyntaxError(f"raw control character {c!r} in a string")
        return self._flush_high_surrogate() + self._char(c)

    def _close_string(self) -> str:
        decoded = None if self._decoded is None else "".join(self._decoded)
        self._in_string = False
        self._decoded = None
        if self._is_key:
            self._expect = _Expect.COLON
            if decoded is not None:
                self._key = decoded
                self._set_member("key", decoded)
        else:
            self._value_done(decoded)
        return '"'

    def _escape_char(self, c: str) -> str:
        escape = self._escape
        assert escape is not None
        if escape == "":
            if c == "u":
                self._escape = "u"
                return ""
            if c not in _SIMPLE_ESCAPES:
                raise JsonSyntaxError(f"invalid escape \\{c}")
            self._escape = None
            return self._flush_high_surrogate() + self._char(_SIMPLE_ESCAPES[c])
        if c not in _HEX_DIGITS:
            raise JsonSyntaxError(f"invalid \\u escape near {c!r}")
        escape += c
        if len(escape) < 5:
            self._escape = escape
            return ""
        self._escape = None
        return self._code_point(int(escape[1:], 16))

    def _code_point(self, code: int) -> str:
        """A \\uXXXX escape: pairs a high surrogate with a following low one, as json.loads."""
        high, self._high_surrogate = self._high_surrogate, None
        if high is not None and 0xDC00 <= code <= 0xDFFF:
            return self._char(chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)))
        prefix = "" if high is None else self._char(chr(high))
        if 0xD800 <= code <= 0xDBFF:
            self._high_surrogate = code
            return prefix
        return prefix + self._char(chr(code))

    def _flush_high_surrogate(self) -> str:
        high, self._high_surrogate = self._high_surrogate, None
        return "" if high is None else self._char(chr(high))

    def _char(self, ch: str) -> str:
        if self._decoded is not None:
            self._decoded.append(ch)
        return _escape_output(ch)


def _escape_output(ch: str) -> str:
    """One decoded character as json.dumps(ensure_ascii=False) writes it (lone surrogates as
    escapes: see the module docstring)."""
    escaped = _ESCAPED_OUTPUT.get(ch)
    if escaped is not None:
        return escaped
    if "\ud800" <= ch <= "\udfff":
        return f"\\u{ord(ch):04x}"
    return ch


def _canonical_number(token: str) -> str:
    """json.dumps(json.loads(token)): ints keep their digits ("-0" -> "0"), floats are written
    by repr ("1E2" -> "100.0"); a float that overflows is kept as written (see the module doc)."""
    try:
        if not any(c in token for c in ".eE"):
            return str(int(token))
        value = float(token)
    except ValueError as exc:  # an int past Python's digit limit: json.loads refuses it too
        raise JsonSyntaxError(f"number {token[:20]}... is too long") from exc
    return repr(value) if math.isfinite(value) else token
