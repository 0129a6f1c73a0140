"""Structured output from an HTTP body: OpenAI's `response_format` or vLLM's `guided_*` extras
-> `engine.sampling_params.StructuredOutput` (the engine applies it; this only maps it).

| body                                                   | StructuredOutput            |
| ------------------------------------------------------ | --------------------------- |
| `response_format: {"type": "text"}` or nothing         | None                        |
| `response_format: {"type": "json_object"}`             | ("json_object", "")         |
| `response_format: {"type": "json_schema", "json_schema": {"name", "schema"}}` | ("json_schema", schema text) |
| `guided_json: {...}` (or its JSON text)                | ("json_schema", schema text)|
| `guided_regex: "..."`                                  | ("regex", the pattern)      |
| `guided_grammar: "..."`                                | ("ebnf", the grammar)       |

At most one of them. Errors name the field the body used (`InvalidRequestError`).
"""

from __future__ import annotations

import json

from engine.errors import InvalidRequestError, check_request
from engine.sampling_params import StructuredOutput
from router.http import schemas

GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "ebnf"}


def structured_output(body: schemas.SamplingFields) -> tuple[StructuredOutput | None, str]:
    """The body's constraint and the field it came from ("response_format" when none)."""
    given = [name for name in GUIDED if getattr(body, name) is not None]
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        given.insert(0, "response_format")
    if not given:
        return None, "response_format"
    check_request(
        len(given) == 1, given[-1], f"give one of response_format and {', '.join(GUIDED)}"
    )
    name = given[0]
    try:
        return _build(body, name), name
    except InvalidRequestError as exc:  # StructuredOutput names its own field "structured"
        raise InvalidRequestError(name, exc.message) from None


def _build(body: schemas.SamplingFields, name: str) -> StructuredOutput:
    if name == "response_format":
        return _response_format(body.response_format)
    value = getattr(body, name)
    if name == "guided_json":
        return StructuredOutput("json_schema", _schema_text(value, name))
    check_request(isinstance(value, str) and value != "", name, "must be a non-empty string")
    return StructuredOutput(GUIDED[name], value)


def _response_format(fmt: schemas.ResponseFormat | None) -> StructuredOutput:
    assert fmt is not None and fmt.type != "text"
    if fmt.type == "json_object":
        return StructuredOutput("json_object", "")
    check_request(
        fmt.json_schema is not None and fmt.json_schema.json_schema is not None,
        "response_format",
        "type json_schema needs json_schema.schema (a JSON schema object)",
    )
    assert fmt.json_schema is not None
    return StructuredOutput(
        "json_schema", _schema_text(fmt.json_schema.json_schema, "response_format")
    )


def _schema_text(schema: object, name: str) -> str:
    """A schema (an object, or JSON text of one) as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise InvalidRequestError(name, "the schema is not valid JSON") from None
    check_request(isinstance(schema, dict), name, "the schema must be a JSON object")
    return json.dumps(schema, separators=(",", ":"))
