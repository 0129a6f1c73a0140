"""The OpenAI front door under random JSON bodies: never a 500, and it still serves afterwards.

The router and its HTTP server are real (tests/http/fake_cluster.py: RouterServer with uvicorn on
127.0.0.1) over fake workers. Hypothesis posts bodies to /v1/completions and
/v1/chat/completions: random JSON, and bodies with the endpoint's own field names holding random
values (a valid model name or not, streamed or not). Each answer must be 200 or a client error
the API documents (400, 404 for an unknown model, 413); pydantic's 422 is answered 400. Bounded
(`max_examples`, small `max_tokens`) so the module runs in seconds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.http.fake_cluster import FakeCluster, disaggregated

FUZZ = settings(
    max_examples=int(os.environ.get("TANDEM_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
CLIENT_ERRORS = {400, 404, 413}
LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
VALUE = LEAF | st.lists(LEAF, max_size=3) | st.dictionaries(st.text(max_size=6), LEAF, max_size=3)
JSON = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
COMMON = (
    "temperature top_p n stop seed presence_penalty frequency_penalty logit_bias user "
    "stream_options response_format top_k min_p repetition_penalty min_tokens ignore_eos "
    "stop_token_ids skip_special_tokens include_stop_str_in_output guided_json guided_regex "
    "ttft_ms tpot_ms slo_class priority best_effort request_id"
).split()
PLAUSIBLE = st.none() | st.booleans() | st.integers(-3, 5) | st.floats(-3, 3) | st.text(max_size=8)
MESSAGE_OK = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=20)}
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | VALUE},
    optional={"content": st.text(max_size=20) | VALUE, "name": VALUE, "tool_calls": VALUE},
)
ENDPOINT_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/v1/completions": {
        "prompt": st.text(max_size=20) | st.lists(st.integers(-5, 300), max_size=5) | VALUE,
        "logprobs": VALUE,
        "echo": VALUE,
    },
    "/v1/chat/completions": {
        "messages": st.lists(MESSAGE, max_size=3) | VALUE,
        "logprobs": VALUE,
        "top_logprobs": VALUE,
        "tools": VALUE,
        "tool_choice": VALUE,
        "max_completion_tokens": st.integers(-2, 4) | VALUE,
    },
}


def bodies(path: str) -> st.SearchStrategy[Any]:
    """Random JSON; the endpoint's fields all holding random values; or a valid request (short
    `max_tokens`) with up to three fields set to small plausible or random values."""
    fields = {**{name: VALUE for name in COMMON}, **ENDPOINT_FIELDS[path]}
    random_fields = st.fixed_dictionaries(
        {"model": st.sampled_from(["fake", "other"]) | VALUE, "max_tokens": LEAF},
        optional=fields,
    )
    prompt = {"prompt": st.text(max_size=20)}
    chat = {"messages": st.lists(MESSAGE_OK, min_size=1, max_size=2)}
    valid = st.fixed_dictionaries(
        {
            "model": st.sampled_from(["fake", "fake", "other"]),
            "max_tokens": st.integers(1, 4),
            "stream": st.booleans(),
            **(prompt if path == "/v1/completions" else chat),
        }
    )
    tweaks = st.dictionaries(st.sampled_from(sorted(fields)), PLAUSIBLE | VALUE, max_size=3)
    nudged = st.tuples(valid, tweaks).map(lambda pair: {**pair[0], **pair[1]})
    return JSON | random_fields | valid | nudged


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeCluster]:
    cluster = FakeCluster(disaggregated())
    yield cluster
    cluster.close()


def answer(cluster: FakeCluster, path: str, body: Any) -> int:
    """The status of one POST, with its body read to the end (streams too). NaN and infinities
    go as Python's json writes them (`NaN`, `Infinity`), as some clients send them."""
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    url = f"{cluster.base_url}{path}"
    with httpx.stream("POST", url, content=content, headers=headers, timeout=10) as response:
        response.read()
        return response.status_code


@pytest.mark.parametrize("path", list(ENDPOINT_FIELDS))
def test_random_bodies_get_ok_or_a_client_error_and_the_door_still_serves(
    fake: FakeCluster, path: str
) -> None:
    @FUZZ
    @given(body=bodies(path))
    def check(body: Any) -> None:
        status = answer(fake, path, body)
        assert status == 200 or status in CLIENT_ERRORS, (status, body)

    check()
    valid: dict[str, Any] = {"model": "fake", "max_tokens": 3}
    if path == "/v1/completions":
        valid["prompt"] = "hello"
    else:
        valid["messages"] = [{"role": "user", "content": "hello"}]
    assert answer(fake, path, valid) == 200
    assert fake.num_active() == 0


def test_bytes_that_are_not_json_get_400(fake: FakeCluster) -> None:
    for raw in (b"", b"{", b"\xff\xfe", b"[1, 2", b'{"model": "fake", "prompt": "a"'):
        response = httpx.post(
            f"{fake.base_url}/v1/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert response.status_code == 400, (raw, response.text)
