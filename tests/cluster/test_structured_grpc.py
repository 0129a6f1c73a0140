"""Structured output and logit_bias through the real gRPC router and real workers on the real
model, disaggregated: the prefill worker samples the first token under the grammar, the decode
worker replays it into its own matcher and samples the rest. Bad grammars are INVALID_ARGUMENT
naming `sampling.structured`, whether the router refuses them (a schema that is not one) or
the worker does (regex / EBNF syntax, which only xgrammar checks), and nothing leaks. One
cluster for the module. Skipped when the `demo` extra (the model package) is missing."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import jsonschema
import pytest

from tests.real_model import skip_without_model

skip_without_model()
pytestmark = pytest.mark.timeout(600)

from tandem.client import TandemClientError  # noqa: E402
from tandem.cluster import ClusterConfig  # noqa: E402
from tests.cluster.cluster_harness import ClusterThread  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "country": {"type": "string", "enum": ["France", "Germany", "Italy"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 50},
    },
    "required": ["city", "country", "population_millions"],
}
QUESTION = [{"role": "user", "content": "Describe the capital of France as JSON."}]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterThread]:
    config = ClusterConfig(
        model="demo",
        num_prefill=1,
        num_decode=1,
        engine_kwargs={"device": "cpu", "dtype": "float32"},
    )
    c = ClusterThread(config)
    yield c
    c.close()


def test_json_schema_stream_parses_and_validates(cluster: ClusterThread) -> None:
    stream = cluster.client.generate(
        QUESTION,
        temperature=0.0,
        max_tokens=64,
        slo="batch",
        structured={"json_schema": SCHEMA},
    )
    chunks = list(stream)
    text = "".join(c.text_delta for c in chunks)
    final = chunks[-1]
    assert final.finish_reason == 1, text  # FINISH_REASON_STOP: the grammar completed
    assert final.timings.HasField("kv_transfer")  # prefill worker, then decode worker
    assert chunks[0].text_delta.startswith("{") and len(chunks) > 2
    jsonschema.validate(json.loads(text), SCHEMA)
    assert cluster.wait_all_free()


def test_sampled_json_object_and_regex(cluster: ClusterThread) -> None:
    text, final = cluster.client.generate_text(
        QUESTION,
        temperature=0.8,
        seed=11,
        max_tokens=160,
        slo="batch",
        structured={"json_object": True},
    )
    assert final.finish_reason == 1 and isinstance(json.loads(text), dict), text
    text, final = cluster.client.generate_text(
        [{"role": "user", "content": "When was the Eiffel tower finished?"}],
        temperature=0.0,
        max_tokens=16,
        slo="batch",
        structured={"regex": r"[0-9]{4}"},
    )
    assert final.finish_reason == 1 and len(text) == 4 and text.isdigit(), text


@pytest.mark.parametrize(
    "structured",
    [
        {"json_schema": '{"type": 5}'},  # the router's check (jsonschema's meta-schema)
        {"json_schema": "{not json"},  # the router's check
        {"regex": "(unclosed"},  # the worker's check (xgrammar)
        {"ebnf": 'root ::= "a" | undefined'},  # the worker's check (xgrammar)
    ],
)
def test_a_bad_grammar_is_invalid_argument_naming_the_field(
    cluster: ClusterThread, structured: dict[str, str]
) -> None:
    with pytest.raises(TandemClientError) as info:
        cluster.client.generate_text(QUESTION, max_tokens=8, slo="batch", structured=structured)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT, info.value.details
    assert info.value.details.startswith("sampling.structured: ")
    assert cluster.wait_all_free()


def test_logit_bias_over_the_wire(cluster: ClusterThread) -> None:
    first = list(cluster.client.generate(QUESTION, temperature=0.0, max_tokens=1, slo="batch"))[
        0
    ].token_ids[0]
    banned = list(
        cluster.client.generate(
            QUESTION, temperature=0.0, max_tokens=1, slo="batch", logit_bias={first: -100.0}
        )
    )[0].token_ids[0]
    assert banned != first
    with pytest.raises(TandemClientError) as info:
        cluster.client.generate_text(QUESTION, max_tokens=1, logit_bias={10**7: 1.0})
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("sampling.logit_bias: ")
    assert cluster.wait_all_free()
