"""Chat turns with tools and tool calls through the router's tokenizers: ByteTokenizer's plain
form, and HfTokenizer with a Hermes-style (Qwen-like) template on a tiny byte-level tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InvalidRequestError
from router.http.tools import HermesToolParser, supports_hermes
from router.tokenizer import ByteTokenizer, ChatTurn, HfTokenizer

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {
    "id": "call_abc",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}
TURNS = [
    ChatTurn("user", "Weather in Paris?", name="ann"),
    ChatTurn("assistant", "", tool_calls=(CALL,)),
    ChatTurn("tool", '{"temp": 21}', tool_call_id="call_abc"),
]

# Modeled on Qwen2.5's template (trimmed): tools in a system turn, calls in <tool_call> tags,
# arguments through `tojson` unless they are already a string, results in <tool_response>.
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call a function with <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "system" and loop.index0 > 0 %}
{{- raise_exception("the system message must come first") }}
{%- elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{{ message.content }}
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": \
{% if tool_call.function.arguments is string %}{{ tool_call.function.arguments }}\
{% else %}{{ tool_call.function.arguments | tojson }}{% endif %}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# ------------------------------------------------------------------ ByteTokenizer


def test_byte_tokenizer_keeps_its_plain_form_without_tools() -> None:
    tok = ByteTokenizer()
    ids = tok.encode_chat([ChatTurn("user", "hi"), ChatTurn("assistant", "yo")], True)
    assert tok.decode(ids) == "user: hi\nassistant: yo\nassistant: "


def test_byte_tokenizer_renders_tools_and_tool_turns() -> None:
    tok = ByteTokenizer()
    text = tok.decode(tok.encode_chat(TURNS, True, tools=TOOLS))
    assert text == (
        f"tools: {json.dumps(TOOLS, separators=(',', ':'))}\n"
        "user (ann): Weather in Paris?\n"
        "assistant: \n"
        'tool_call call_abc: get_weather {"city":"Paris"}\n'
        'tool [call_abc]: {"temp": 21}\n'
        "assistant: "
    )


@pytest.mark.parametrize(
    "call",
    [
        {"id": "call_abc", "type": "function"},
        {"id": 7, "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}},
    ],
)
def test_malformed_tool_calls_are_request_errors(call: dict[str, Any], tmp_path: Path) -> None:
    turns = [ChatTurn("assistant", "", tool_calls=(call,))]
    for tok in (ByteTokenizer(), HfTokenizer(_hermes_tokenizer_dir(tmp_path))):
        with pytest.raises(InvalidRequestError) as info:
            tok.encode_chat(turns, False)
        assert info.value.field == "chat"


# ------------------------------------------------------------------ HfTokenizer


def _hermes_tokenizer_dir(path: Path) -> Path:
    """A byte-level BPE with no merges (every text round-trips) and HERMES_TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = HERMES_TEMPLATE
    fast.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def hermes(tmp_path_factory: pytest.TempPathFactory) -> HfTokenizer:
    return HfTokenizer(_hermes_tokenizer_dir(tmp_path_factory.mktemp("hermes_tokenizer")))


def test_hf_template_renders_tools_and_tool_turns(hermes: HfTokenizer) -> None:
    text = hermes.decode(hermes.encode_chat(TURNS, True, tools=TOOLS))
    assert json.dumps(TOOLS[0]) in text  # tools reached the template
    # arguments went in as a dict: `tojson` rewrote the compact text with spaces
    rendered_call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<tool_call>\n{rendered_call}\n</tool_call>" in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    # what the template writes, the Hermes parser reads back
    call_block = text[text.index("<tool_call>\n") : text.index("</tool_call>\n") + 12]
    _, calls = HermesToolParser().parse_all(call_block)
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}')]


def test_hf_template_without_tools_is_unchanged(hermes: HfTokenizer) -> None:
    turns = [ChatTurn("user", "hi")]
    assert hermes.encode_chat(turns, True) == hermes.encode_chat(turns, True, tools=None)
    assert hermes.encode_chat(turns, True, tools=[]) == hermes.encode_chat(turns, True)
    assert "<tools>" not in hermes.decode(hermes.encode_chat(turns, True))


def test_hf_arguments_that_are_not_an_object_stay_text(hermes: HfTokenizer) -> None:
    cut_short = {**CALL, "function": {"name": "get_weather", "arguments": '{"city":"Pa'}}
    turns = [ChatTurn("user", "hi"), ChatTurn("assistant", "", tool_calls=(cut_short,))]
    assert '"arguments": {"city":"Pa}' in hermes.decode(hermes.encode_chat(turns, False))


def test_hf_template_errors_are_request_errors(hermes: HfTokenizer) -> None:
    turns = [ChatTurn("user", "hi"), ChatTurn("system", "late")]
    with pytest.raises(InvalidRequestError) as info:
        hermes.encode_chat(turns, True, tools=TOOLS)
    assert info.value.field == "chat" and "system message must come first" in str(info.value)


def test_the_template_is_detected_as_hermes() -> None:
    assert supports_hermes(HERMES_TEMPLATE)
