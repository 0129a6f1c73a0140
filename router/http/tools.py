"""Tool calling for the OpenAI-compatible API: request checks, forced calls, Hermes parsing.

Two ways a model calls tools:
- forced (tool_choice "required" or a named function): the output is constrained by
  `forced_tool_schema`'s JSON schema, then read back by `parse_forced_calls`;
- "auto": the model decides, in its chat template's own convention; for Hermes-style templates
  (`supports_hermes`) `HermesToolParser` reads the calls out of the text, streamed or whole.

Everything here is pure (no torch, no I/O). Callers validate first (`check_tools`); the other
functions assume valid `tools` / `tool_choice`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from engine.errors import InvalidRequestError, check_request
from router.http.hermes import HermesToolParser, supports_hermes
from router.http.tool_call import (
    ParserEvent,
    ToolCall,
    ToolOutputError,
    dump_arguments,
    new_call_id,
)

__all__ = [
    "HermesToolParser",
    "ParserEvent",
    "ToolCall",
    "ToolOutputError",
    "check_tools",
    "dump_arguments",
    "forced_tool_schema",
    "new_call_id",
    "parse_forced_calls",
    "supports_hermes",
]

MAX_TOOLS = 128  # OpenAI's limit; it also bounds the forced-call grammar
TOOL_CHOICES = ("none", "auto", "required")
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
_LITERAL_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # values, not schemas


# ------------------------------------------------------------------ validation


def check_tools(tools: object, tool_choice: object) -> None:
    """Validates OpenAI's `tools` and `tool_choice` (either may be None: absent).

    Raises InvalidRequestError naming "tools" (not a list of {"type": "function", "function":
    {"name", "description"?, "parameters"?, "strict"?}}, a bad or duplicate name, parameters
    that are not a valid JSON schema of an object, more than MAX_TOOLS) or "tool_choice" (not
    "none" | "auto" | "required" | {"type": "function", "function": {"name"}}, a named function
    that is not in tools, "required" with no tools). An empty list counts as no tools.
    """
    names = [] if tools is None else _check_tool_list(tools)
    _check_tool_choice(tool_choice, names)


def _check_tool_list(tools: object) -> list[str]:
    check_request(isinstance(tools, list), "tools", "must be a list of tools")
    assert isinstance(tools, list)
    check_request(len(tools) <= MAX_TOOLS, "tools", f"at most {MAX_TOOLS} tools")
    names: list[str] = []
    for i, tool in enumerate(tools):
        name = _check_tool(tool, f"tools[{i}]")
        check_request(name not in names, "tools", f"tools[{i}]: duplicate function name {name!r}")
        names.append(name)
    return names


def _check_tool(tool: object, where: str) -> str:
    check_request(
        isinstance(tool, dict) and tool.get("type") == "function",
        "tools",
        f'{where} must be {{"type": "function", "function": {{...}}}}',
    )
    assert isinstance(tool, dict)
    function = tool.get("function")
    check_request(isinstance(function, dict), "tools", f"{where}.function must be an object")
    assert isinstance(function, dict)
    name = function.get("name")
    check_request(
        isinstance(name, str) and _FUNCTION_NAME.fullmatch(name) is not None,
        "tools",
        f"{where}.function.name must be 1-64 letters, digits, '_' or '-'",
    )
    description = function.get("description")
    check_request(
        description is None or isinstance(description, str),
        "tools",
        f"{where}.function.description must be a string",
    )
    strict = function.get("strict")
    check_request(
        strict is None or isinstance(strict, bool), "tools", f"{where}.function.strict: a bool"
    )
    if function.get("parameters") is not None:
        _check_parameters(function["parameters"], f"{where}.function.parameters")
    assert isinstance(name, str)
    return name


def _check_parameters(schema: object, where: str) -> None:
    check_request(isinstance(schema, dict), "tools", f"{where} must be a JSON schema object")
    assert isinstance(schema, dict)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequestError(
            "tools", f"{where} is not a valid JSON schema: {exc.message}"
        ) from exc
    check_request(
        schema.get("type", "object") == "object",
        "tools",
        f'{where} must describe an object ("type": "object")',
    )


def _check_tool_choice(tool_choice: object, names: list[str]) -> None:
    if tool_choice is None or tool_choice in ("none", "auto"):
        return
    if tool_choice == "required":
        check_request(bool(names), "tool_choice", '"required" needs at least one tool')
        return
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    check_request(
        isinstance(tool_choice, dict)
        and tool_choice.get("type") == "function"
        and isinstance(function, dict)
        and isinstance(function.get("name"), str),
        "tool_choice",
        f'must be one of {", ".join(TOOL_CHOICES)} or {{"type": "function", "function": '
        '{"name": ...}}',
    )
    assert isinstance(function, dict)
    check_request(
        function["name"] in names,
        "tool_choice",
        f"names function {function['name']!r}, which is not in tools",
    )


# ------------------------------------------------------------------ forced calls


def forced_tool_schema(tools: list[dict[str, Any]], tool_choice: object) -> str | None:
    """The JSON schema (text) the output must follow when `tool_choice` forces calls; None for
    "auto", "none" or absent.

    "required": an array of 1+ objects {"name": <const>, "arguments": <that tool's parameters>},
    an anyOf over the tools so each name pairs with its own schema. Each tool's parameters sit
    under "$defs"/"tool_<i>" with their local "$ref"s ("#...") rebased there, so tools with
    their own "$defs" do not collide. A named function: that function's parameters schema
    itself (the name is known). A tool without parameters takes an empty object.
    Precondition: `check_tools(tools, tool_choice)` passed.
    """
    if tool_choice == "required":
        return json.dumps(_required_schema(tools))
    name = _named_function(tool_choice)
    if name is None:
        return None
    return json.dumps(_parameters(_find_tool(tools, name)))


def parse_forced_calls(
    text: str, tools: list[dict[str, Any]], tool_choice: object
) -> list[ToolCall]:
    """The output constrained by `forced_tool_schema` -> ToolCalls with fresh ids and canonical
    arguments (`dump_arguments`). Raises ToolOutputError (a ValueError) when the text is not
    what the schema asks for, e.g. cut short by max_tokens; ValueError when `tool_choice`
    forces no call. Arguments are not re-validated against the schema: the grammar did that.
    """
    value = _loads(text)
    if tool_choice == "required":
        if not isinstance(value, list) or not value:
            raise ToolOutputError("expected a non-empty JSON array of tool calls")
        names = {tool["function"]["name"] for tool in tools}
        return [_forced_call(item, names) for item in value]
    name = _named_function(tool_choice)
    if name is None:
        raise ValueError(f"tool_choice {tool_choice!r} forces no tool call")
    return [ToolCall(new_call_id(), name, _arguments_text(value))]


def _required_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    options: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        slot = f"tool_{i}"
        defs[slot] = _rebase_refs(_parameters(function), f"#/$defs/{slot}")
        options.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": function["name"]},
                    "arguments": {"$ref": f"#/$defs/{slot}"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {"type": "array", "minItems": 1, "items": {"anyOf": options}, "$defs": defs}


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    schema = function.get("parameters")
    if not schema:
        return dict(_NO_PARAMETERS)
    return {"type": "object", **schema}


def _rebase_refs(schema: Any, base: str) -> Any:
    """A copy of `schema` whose local "$ref"s ("#", "#/...") point under `base` instead."""
    if isinstance(schema, list):
        return [_rebase_refs(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in _LITERAL_KEYWORDS:
            out[key] = value
        else:
            out[key] = _rebase_refs(value, base)
    return out


def _named_function(tool_choice: object) -> str | None:
    if isinstance(tool_choice, dict):
        return str(tool_choice["function"]["name"])
    return None


def _find_tool(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for tool in tools:
        if tool["function"]["name"] == name:
            return dict(tool["function"])
    raise ValueError(f"no tool named {name!r}")  # check_tools rules this out


def _forced_call(item: object, names: set[str]) -> ToolCall:
    if not isinstance(item, dict) or set(item) != {"name", "arguments"}:
        raise ToolOutputError('each call must be {"name": ..., "arguments": {...}}')
    if item["name"] not in names:
        raise ToolOutputError(f"no tool named {item['name']!r}")
    return ToolCall(new_call_id(), item["name"], _arguments_text(item["arguments"]))


def _arguments_text(arguments: object) -> str:
    if not isinstance(arguments, dict):
        raise ToolOutputError("the arguments must be a JSON object")
    try:
        return dump_arguments(arguments)
    except ValueError as exc:  # an overflowing number parsed as inf
        raise ToolOutputError(f"the arguments are not JSON: {exc}") from exc


def _loads(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ToolOutputError(f"{constant} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except ToolOutputError:
        raise
    except ValueError as exc:  # JSONDecodeError, or an int past Python's digit limit
        raise ToolOutputError(f"the output is not JSON: {exc}") from exc
