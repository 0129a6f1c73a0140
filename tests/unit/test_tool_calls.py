"""Tool calling (router/http/tools.py): request checks, the forced-call schema and its parse, and
the Hermes parser fed whole and cut every way, against parse_all and plain json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from router.http.json_stream import JsonStream, JsonSyntaxError
from router.http.tools import (
    HermesToolParser,
    ParserEvent,
    ToolCall,
    ToolOutputError,
    check_tools,
    dump_arguments,
    forced_tool_schema,
    parse_forced_calls,
    supports_hermes,
)


def _tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": f"the {name} tool"}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


WEATHER = _tool(
    "get_weather",
    {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
)
SEARCH = _tool(  # its own $defs, as pydantic writes them: must not collide with another tool's
    "search",
    {
        "type": "object",
        "properties": {"query": {"$ref": "#/$defs/Query"}},
        "required": ["query"],
        "$defs": {"Query": {"type": "string", "minLength": 1}},
    },
)
SORT = _tool(
    "sort",
    {
        "type": "object",
        "properties": {"query": {"$ref": "#/$defs/Query"}},
        "required": ["query"],
        "$defs": {"Query": {"type": "array", "items": {"type": "integer"}}},
    },
)
NOW = _tool("now")  # no parameters
TOOLS = [WEATHER, SEARCH, SORT, NOW]
NAMED = {"type": "function", "function": {"name": "get_weather"}}

# ------------------------------------------------------------------ check_tools


@pytest.mark.parametrize("choice", [None, "none", "auto", "required", NAMED])
def test_valid_tools_and_choices_pass(choice: object) -> None:
    check_tools(TOOLS, choice)


@pytest.mark.parametrize(
    ("tools", "choice", "field"),
    [
        ({"type": "function"}, None, "tools"),  # not a list
        ([{"type": "retrieval"}], None, "tools"),
        ([{"type": "function", "function": "get_weather"}], None, "tools"),
        ([_tool("has space")], None, "tools"),
        ([_tool("x" * 65)], None, "tools"),
        ([WEATHER, WEATHER], None, "tools"),  # duplicate names
        ([_tool("f", {"type": "array"})], None, "tools"),  # not an object schema
        ([_tool("f", {"type": "object", "properties": 3})], None, "tools"),  # invalid schema
        ([_tool("f", {"type": "no-such-type"})], None, "tools"),
        ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], None, "tools"),
        ([{"type": "function", "function": {"name": "f", "description": 1}}], None, "tools"),
        ([_tool(f"f{i}") for i in range(129)], None, "tools"),
        (TOOLS, "sometimes", "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (TOOLS, {"type": "allowed_tools", "function": {"name": "now"}}, "tool_choice"),
        (None, "required", "tool_choice"),
        ([], "required", "tool_choice"),
        (None, NAMED, "tool_choice"),
    ],
)
def test_invalid_tools_name_the_field(tools: object, choice: object, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_tools(tools, choice)
    assert info.value.field == field


# ------------------------------------------------------------------ forced calls


def _validator(tools: list[dict[str, Any]], choice: object) -> jsonschema.Validator:
    text = forced_tool_schema(tools, choice)
    assert text is not None
    schema = json.loads(text)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


@pytest.mark.parametrize("choice", [None, "none", "auto"])
def test_no_schema_unless_calls_are_forced(choice: object) -> None:
    assert forced_tool_schema(TOOLS, choice) is None


def test_required_with_one_tool() -> None:
    v = _validator([WEATHER], "required")
    assert v.is_valid([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    assert v.is_valid([{"name": "get_weather", "arguments": {"city": "A", "days": 2}}] * 2)
    assert not v.is_valid([])
    assert not v.is_valid({"name": "get_weather", "arguments": {"city": "Paris"}})
    assert not v.is_valid([{"name": "get_weather", "arguments": {"days": 2}}])
    assert not v.is_valid([{"name": "other", "arguments": {"city": "Paris"}}])
    assert not v.is_valid([{"name": "get_weather", "arguments": {"city": "P"}, "x": 1}])


def test_required_pairs_each_name_with_its_own_schema() -> None:
    v = _validator(TOOLS, "required")
    good = [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "search", "arguments": {"query": "tandem"}},
        {"name": "sort", "arguments": {"query": [3, 1, 2]}},
        {"name": "now", "arguments": {}},
    ]
    assert v.is_valid(good)
    for wrong in (
        {"name": "search", "arguments": {"query": [3, 1]}},  # sort's $defs/Query, not search's
        {"name": "sort", "arguments": {"query": "tandem"}},
        {"name": "search", "arguments": {"query": ""}},  # minLength from its own $defs
        {"name": "now", "arguments": []},
        {"name": "get_weather", "arguments": {"query": "x"}},
    ):
        assert not v.is_valid([*good, wrong]), wrong


def test_named_choice_is_the_functions_parameters() -> None:
    v = _validator(TOOLS, NAMED)
    assert v.is_valid({"city": "Paris", "days": 3})
    assert not v.is_valid({"days": 3})
    assert not v.is_valid([{"name": "get_weather", "arguments": {"city": "Paris"}}])
    search = _validator(TOOLS, {"type": "function", "function": {"name": "search"}})
    assert search.is_valid({"query": "x"}) and not search.is_valid({"query": ""})
    empty = _validator(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert empty.is_valid({}) and not empty.is_valid("x")


def test_xgrammar_compiles_the_required_schema() -> None:
    xgrammar = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    text = forced_tool_schema(TOOLS, "required")
    assert text is not None
    grammar = xgrammar.Grammar.from_json_schema(text)
    ok = '[{"name": "search", "arguments": {"query": "a"}}, {"name": "now", "arguments": {}}]'
    assert _is_grammar_accept_string(grammar, ok)
    assert not _is_grammar_accept_string(grammar, '[{"name": "sort", "arguments": {"query": "a"}}]')


def test_parse_forced_calls() -> None:
    text = '[{"name": "search", "arguments": {"query": "é"}}, {"name": "now", "arguments": {}}]'
    calls = parse_forced_calls(text, TOOLS, "required")
    assert [(c.name, c.arguments) for c in calls] == [("search", '{"query":"é"}'), ("now", "{}")]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    assert calls[0].id != calls[1].id
    (call,) = parse_forced_calls('{ "city" : "Paris" }', TOOLS, NAMED)
    assert (call.name, call.arguments) == ("get_weather", '{"city":"Paris"}')


@pytest.mark.parametrize(
    ("text", "choice"),
    [
        ('[{"name": "search", "arguments": {"query": "a"', "required"),  # cut by max_tokens
        ("[]", "required"),
        ('{"name": "search", "arguments": {}}', "required"),
        ('[{"name": "nope", "arguments": {}}]', "required"),
        ('[{"name": "now"}]', "required"),
        ('[{"name": "now", "arguments": []}]', "required"),
        ('{"city": NaN}', NAMED),
        ('{"city": 1e400}', NAMED),
        ('["Paris"]', NAMED),
    ],
)
def test_parse_forced_calls_refuses_other_output(text: str, choice: object) -> None:
    with pytest.raises(ToolOutputError):
        parse_forced_calls(text, TOOLS, choice)


def test_parse_forced_calls_needs_a_forcing_choice() -> None:
    with pytest.raises(ValueError, match="forces no tool call"):
        parse_forced_calls("{}", TOOLS, "auto")


# ------------------------------------------------------------------ the JSON scanner


def _scan(text: str) -> str:
    scanner = JsonStream()
    out = "".join(scanner.push(c) for c in text)
    assert scanner.done
    return out


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(), _VALUES, max_size=5), st.booleans(), st.sampled_from([None, 2]))
def test_scanner_writes_the_canonical_json(value: dict[str, Any], ascii: bool, indent: Any) -> None:
    """Any formatting (escaped or raw non-ASCII, so surrogate pairs too; indented or not)."""
    text = json.dumps(value, ensure_ascii=ascii, indent=indent)
    assert _scan(text) == dump_arguments(value)


def test_scanner_normalizes_numbers_and_escapes() -> None:
    text = '{"a": [1E2, -0, -0.0, 1.50, 1e400], "b": "\\/\\u0041\\ud83d\\ude00\\ud83d", "c": true}'
    assert _scan(text) == '{"a":[100.0,0,-0.0,1.5,1e400],"b":"/A😀\\ud83d","c":true}'


@pytest.mark.parametrize(
    "text",
    [
        "[1]",
        "{'a': 1}",
        '{"a": 01}',
        '{"a": 1,}',
        '{"a": NaN}',
        '{"a": "\x01"}',
        '{"a": tru}',
        '{"a": 1]',
        '{"a" 1}',
        '{"a": "\\x"}',
        '{"a": "\\u12G4"}',
        '{"a": 1}}',
        '{"a": 1 2}',
    ],
)
def test_scanner_rejects_what_json_rejects(text: str) -> None:
    """And also a top-level array and NaN, which Python's json takes."""
    if text not in ("[1]", '{"a": NaN}'):
        with pytest.raises(ValueError):
            json.loads(text)
    scanner = JsonStream()
    with pytest.raises(JsonSyntaxError):
        for c in text:
            scanner.push(c)


# ------------------------------------------------------------------ the Hermes parser


def _call_text(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


WEATHER_ARGS = '{"city": "Paris", "days": 3, "units": ["C", "F"]}'
TRICKY_ARGS = '{ "q" : "a </tool_call> b <tool_call> \\"x\\" \\u00e9", "n": [1E1, -0, null] }'
MALFORMED = '<tool_call>\n{"name": get_weather}\n</tool_call>'
# (text, content outside calls, [(name, raw arguments)])
CASES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("Just an answer, no tools.", "Just an answer, no tools.", []),
    (_call_text("get_weather", WEATHER_ARGS), "", [("get_weather", WEATHER_ARGS)]),
    (
        _call_text("get_weather", WEATHER_ARGS) + "\n" + _call_text("search", TRICKY_ARGS),
        "\n",
        [("get_weather", WEATHER_ARGS), ("search", TRICKY_ARGS)],
    ),
    (
        "Let me check.\n" + _call_text("search", '{"q": "x"}'),
        "Let me check.\n",
        [("search", '{"q": "x"}')],
    ),
    (
        '<tool_call>{"arguments": {"b": [true]}, "name": "now"}</tool_call>done',
        "done",
        [("now", '{"b": [true]}')],
    ),
    ('<tool_call>\n{"name": "now"}\n</tool_call>', "", [("now", "{}")]),
    ("if a < b and c <tool_ d <<tool_call", "if a < b and c <tool_ d <<tool_call", []),
    ("ends with a tag prefix <tool", "ends with a tag prefix <tool", []),
    ("x <", "x <", []),
    ("before " + MALFORMED + " after", "before " + MALFORMED + " after", []),
    (
        '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>',  # arguments as a string
        '<tool_call>{"name": "now", "arguments": "{}"}</tool_call>',
        [],
    ),
    ('<tool_call><tool_call>{"name": "now"}', "<tool_call>", [("now", "{}")]),  # no close
    ('<tool_call>{"name": "now"} trailing', " trailing", [("now", "{}")]),
    ('<tool_call>{"name": "now", "arg', '<tool_call>{"name": "now", "arg', []),  # cut short
]


def _canonical(arguments: str) -> str:
    return json.dumps(json.loads(arguments), separators=(",", ":"), ensure_ascii=False)


def _check_events(events: list[ParserEvent], content: str, calls: list[tuple[str, str]]) -> None:
    """Content concatenates to `content`; call i's first event is its only head (id, name),
    its argument pieces concatenate to the canonical arguments; indices appear in order."""
    assert "".join(e.content for e in events if e.content is not None) == content
    heads = [e for e in events if e.name is not None]
    assert [(e.index, e.name) for e in heads] == [(i, n) for i, (n, _) in enumerate(calls)]
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", str(e.id)) for e in heads)
    for i, (_, arguments) in enumerate(calls):
        mine = [e for e in events if e.index == i]
        assert mine[0].id is not None and mine[0].arguments is None
        assert all(e.id is None and e.name is None and e.content is None for e in mine[1:])
        assert "".join(str(e.arguments) for e in mine[1:]) == _canonical(arguments)
    for e in events:
        assert (e.content is None) != (e.index is None)


def _stream(text: str, cuts: list[int]) -> tuple[HermesToolParser, list[ParserEvent]]:
    parser = HermesToolParser()
    bounds = [0, *sorted(set(cuts)), len(text)]
    events = [e for a, b in zip(bounds, bounds[1:]) for e in parser.feed(text[a:b])]
    return parser, events + parser.finish()


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_parse_all(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = HermesToolParser().parse_all(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == [(n, _canonical(a)) for n, a in calls]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_stream_in_fixed_size_chunks_and_every_two_way_split(
    text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    for size in range(1, len(text) + 1):
        parser, events = _stream(text, list(range(size, len(text), size)))
        _check_events(events, content, calls)
        assert parser.broken_indices == ()
    for cut in range(len(text) + 1):
        _check_events(_stream(text, [cut])[1], content, calls)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_stream_cut_anywhere_agrees_with_parse_all(data: st.DataObject) -> None:
    text, content, calls = data.draw(st.sampled_from(CASES))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    _check_events(_stream(text, cuts)[1], content, calls)


def test_a_call_broken_after_its_head_stays_in_the_stream_but_not_in_parse_all() -> None:
    broken = '<tool_call>{"name": "search", "arguments": {"q": "ab",, "x"}}</tool_call>'
    text = broken + "\n" + _call_text("now", "{}")
    for size in (1, 3, len(text)):
        parser, events = _stream(text, list(range(size, len(text), size)))
        assert parser.broken_indices == (0,)
        assert "".join(e.content or "" for e in events) == broken + "\n"
        assert "".join(e.arguments or "" for e in events if e.index == 0) == '{"q":"ab",'
        assert [e.name for e in events if e.name] == ["search", "now"]
    content, calls = HermesToolParser().parse_all(text)
    assert content == broken + "\n"
    assert [(c.name, c.arguments) for c in calls] == [("now", "{}")]


def test_tool_names_turn_unknown_functions_into_content() -> None:
    text = _call_text("delete_everything", "{}") + _call_text("now", "{}")
    content, calls = HermesToolParser(tool_names=["now"]).parse_all(text)
    assert content == _call_text("delete_everything", "{}")
    assert [c.name for c in calls] == ["now"]


def test_parse_all_leaves_the_streaming_parser_alone() -> None:
    parser = HermesToolParser()
    assert parser.feed("abc <tool") == [ParserEvent(content="abc ")]
    parser.parse_all(_call_text("now", "{}"))
    assert parser.feed("_call>") == []
    assert [e.name for e in parser.feed('{"name": "now", "arguments": {}}')] == ["now", None]


def test_tool_call_is_frozen() -> None:
    call = ToolCall("call_x", "f", "{}")
    with pytest.raises(AttributeError):
        call.name = "g"  # type: ignore[misc]


def test_supports_hermes() -> None:
    assert supports_hermes("{% for t in tools %}...<tool_call>\n{{ t }}</tool_call>{% endfor %}")
    assert not supports_hermes("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not supports_hermes(None)


def test_the_tool_modules_import_no_torch() -> None:
    code = (
        "import sys, router.http.tools, router.tokenizer\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
