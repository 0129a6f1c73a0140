"""The data a tool call travels in: whole calls, streaming deltas, and their canonical text.

`router.http.tools` re-exports everything here; import from there.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

_ID_ALPHABET = string.ascii_letters + string.digits
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ToolOutputError(ValueError):
    """The model's output is not the tool call(s) it was constrained to (e.g. cut short by
    max_tokens, or the grammar let through something the parser refuses)."""


@dataclass(frozen=True)
class ToolCall:
    """One complete call. `arguments` is JSON text (an object) in canonical form (see
    `dump_arguments`); `id` is OpenAI-style `call_<24 letters/digits>`, random."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ParserEvent:
    """One streaming delta: either `content` (text outside tool calls; every other field None),
    or a tool-call delta for call `index`: its first delta carries `id` and `name` (arguments
    None), the following ones carry `arguments` pieces whose concatenation is the call's final
    arguments JSON."""

    content: str | None = None
    index: int | None = None
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


def new_call_id() -> str:
    """A fresh random id like OpenAI's: `call_` and 24 ASCII letters or digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def dump_arguments(arguments: object) -> str:
    """Canonical arguments text: `json.dumps` with compact separators and `ensure_ascii=False`,
    except that lone surrogates (from a model's unpaired `\\ud83d` escape) are written as
    `\\uXXXX` escapes: json.dumps would write the raw code unit, which UTF-8 cannot encode, and
    the HTTP response would fail. Raises ValueError for NaN or infinite numbers (not JSON)."""
    text = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
