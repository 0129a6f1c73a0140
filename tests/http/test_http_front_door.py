"""The HTTP front door over fake workers (no Ray, no model): keys, statuses, the body's field
names in errors, what reaches the workers, and how streams end when something fails.

The router, its HTTP server and the clients are real (RouterServer with uvicorn on 127.0.0.1,
the official `openai` client, httpx); only the workers are tandem.testing's fakes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2 as httpx
import openai
import pytest

from engine.sampling_params import StructuredOutput
from router.config import RouterConfig
from router.server import RouterServer
from router.tokenizer import ByteTokenizer
from tandem.testing.fake_worker import FailMode
from tests.http.fake_cluster import FakeCluster, RecordingWorker, disaggregated

KEY = "test-key-0123456789abcdef"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeCluster]:
    cluster = FakeCluster(disaggregated(step_s=0.01))
    yield cluster
    cluster.close()


def client(cluster: FakeCluster, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key=api_key, max_retries=0)


def post(cluster: FakeCluster, path: str, body: Any, **kw: Any) -> httpx.Response:
    kw.setdefault("timeout", 10)
    return httpx.post(f"{cluster.base_url}{path}", json=body, **kw)


def data_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def until(cond: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def prefilled(cluster: FakeCluster) -> list[Any]:
    worker = cluster.workers["prefill"]
    assert isinstance(worker, RecordingWorker)
    return worker.requests


# -- 401, 503, 413 --------------------------------------------------------------------------


def test_401_unless_the_key_is_sent() -> None:
    cluster = FakeCluster(disaggregated(), api_key=KEY)
    try:
        with pytest.raises(openai.AuthenticationError) as wrong:
            client(cluster, "not-the-key").chat.completions.create(model="fake", messages=CHAT)
        error = wrong.value.response.json()["error"]
        assert error["type"] == "authentication_error" and error["param"] == "authorization"
        assert "invalid" in error["message"] and "not-the-key" not in error["message"]
        missing = httpx.get(f"{cluster.base_url}/v1/models")
        assert missing.status_code == 401 and "missing" in missing.json()["error"]["message"]
        out = client(cluster, KEY).chat.completions.create(
            model="fake", messages=CHAT, max_tokens=4
        )
        assert out.usage is not None and out.usage.completion_tokens == 4
        for path in ("/health", "/metrics"):  # probes and scrapes need no key
            assert httpx.get(f"{cluster.base_url}{path}").status_code == 200
    finally:
        cluster.close()


def test_503_when_no_worker_can_serve() -> None:
    cluster = FakeCluster(None)
    try:
        health = httpx.get(f"{cluster.base_url}/health")
        assert health.status_code == 503
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as down:
                client(cluster).chat.completions.create(model="fake", messages=CHAT, stream=stream)
            assert down.value.status_code == 503
            error = down.value.response.json()["error"]
            assert error["type"] == "service_unavailable_error" and error["code"] == "no_workers"
    finally:
        cluster.close()


def test_413_for_a_body_over_the_limit() -> None:
    cluster = FakeCluster(disaggregated(), max_message_bytes=1024)
    try:
        big = {"model": "fake", "messages": [{"role": "user", "content": "x" * 2000}]}
        declared = post(cluster, "/v1/chat/completions", big)
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "request_too_large"
        chunked = httpx.post(  # no Content-Length: caught while the body is read
            f"{cluster.base_url}/v1/chat/completions",
            content=iter([json.dumps(big).encode()[i : i + 512] for i in range(0, 2100, 512)]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413 and "error" in chunked.json()
        assert post(cluster, "/v1/chat/completions", {**big, "messages": CHAT}).status_code == 200
    finally:
        cluster.close()


def test_a_taken_http_port_is_an_error_naming_it() -> None:
    async def start(port: int) -> None:
        server = RouterServer(RouterConfig(max_model_len=64, http_port=port), ByteTokenizer())
        try:
            with pytest.raises(OSError, match=f"http_port: cannot bind 127.0.0.1:{port}"):
                await server.start()
        finally:
            await server.stop(grace_s=0.1)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        asyncio.run(start(taken.getsockname()[1]))


# -- 400: the body's names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "headers", "param"),
    [
        ({"temperature": -1}, {}, "temperature"),
        ({"top_p": 0}, {}, "top_p"),
        ({"n": 17}, {}, "n"),
        ({"max_tokens": 0}, {}, "max_tokens"),
        ({"max_completion_tokens": 10_000}, {}, "max_completion_tokens"),
        ({"logprobs": True, "top_logprobs": 21}, {}, "top_logprobs"),
        ({"top_logprobs": 2}, {}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, {}, "logit_bias"),
        ({"logit_bias": {"300": 1}}, {}, "logit_bias"),
        ({"stop_token_ids": [99999]}, {}, "stop_token_ids"),
        ({"response_format": {"type": "json_schema"}}, {}, "response_format"),
        ({"response_format": {"type": "yaml"}}, {}, "response_format.type"),
        ({"guided_regex": "a+", "guided_grammar": "root ::= 'a'"}, {}, "guided_grammar"),
        ({"guided_json": "{not json"}, {}, "guided_json"),
        ({"slo_class": "gold"}, {}, "slo_class"),
        ({}, {"x-tandem-slo-class": "gold"}, "x-tandem-slo-class"),
        ({"priority": 5000}, {}, "priority"),
        ({}, {"x-tandem-priority": "high"}, "x-tandem-priority"),
        ({"request_id": "bad id"}, {}, "request_id"),
        ({}, {"x-request-id": "bad id"}, "x-request-id"),
        ({}, {"x-tandem-timeout-s": "-1"}, "x-tandem-timeout-s"),
        ({"tool_choice": "required"}, {}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, {}, "tools"),
        ({"messages": []}, {}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            {},
            "messages[0].content",
        ),
    ],
)
def test_400_names_the_body_field(
    fake: FakeCluster, fields: dict[str, Any], headers: dict[str, str], param: str
) -> None:
    body = {"model": "fake", "messages": CHAT, **fields}
    response = post(fake, "/v1/chat/completions", body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)


def test_a_non_text_content_part_is_refused_as_such(fake: FakeCluster) -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    body = {"model": "fake", "messages": [{"role": "user", "content": [image]}]}
    error = post(fake, "/v1/chat/completions", body).json()["error"]
    assert error["param"] == "messages[0].content" and "only 'text'" in error["message"]


def test_completions_400s_name_prompt_and_echo(fake: FakeCluster) -> None:
    for fields, param in (
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], [999]]}, "prompt"),
        ({"prompt": "x" * 600}, "prompt"),  # 600 byte tokens: over the 512-token context
        ({"prompt": "hi", "echo": True, "logprobs": 1}, "echo"),
    ):
        response = post(fake, "/v1/completions", {"model": "fake", **fields})
        assert response.status_code == 400, fields
        assert response.json()["error"]["param"] == param


# -- what reaches the workers ----------------------------------------------------------------


def test_n_choices_are_child_requests_with_consecutive_seeds(fake: FakeCluster) -> None:
    before = len(prefilled(fake))
    out = client(fake).chat.completions.create(
        model="fake",
        messages=CHAT,
        n=3,
        seed=5,
        max_tokens=3,
        extra_body={"request_id": "job-7"},
    )
    assert out.id == "chatcmpl-job-7" and [c.index for c in out.choices] == [0, 1, 2]
    sent = sorted(prefilled(fake)[before:], key=lambda r: r.request_id)
    assert [r.request_id.rsplit("#", 1)[0] for r in sent] == ["job-7-0", "job-7-1", "job-7-2"]
    assert [r.sampling_params.seed for r in sent] == [5, 6, 7]
    assert out.usage is not None and out.usage.completion_tokens == 9


def test_sampling_fields_reach_the_worker(fake: FakeCluster) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    client(fake).chat.completions.create(
        model="fake",
        messages=CHAT,
        max_completion_tokens=5,
        stop="zz",
        logit_bias={"65": 5},
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        extra_body={"top_k": -1, "min_p": 0.1, "ignore_eos": True},
        extra_headers={"x-tandem-priority": "3", "x-tandem-ttft-ms": "5000"},
    )
    req = prefilled(fake)[-1]
    params = req.sampling_params
    assert params.max_tokens == 5 and params.stop == ("zz",) and params.logit_bias == ((65, 5.0),)
    assert params.top_k == 0 and params.min_p == 0.1 and params.ignore_eos
    assert params.structured == StructuredOutput(
        "json_schema", json.dumps(schema, separators=(",", ":"))
    )
    assert req.priority == 3
    client(fake).completions.create(
        model="fake", prompt="abc", max_tokens=2, extra_body={"guided_regex": "[ab]+"}
    )
    assert prefilled(fake)[-1].sampling_params.structured == StructuredOutput("regex", "[ab]+")


def test_forced_tool_choice_constrains_the_output(fake: FakeCluster) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    out = client(fake).chat.completions.create(
        model="fake",
        messages=CHAT,
        max_tokens=4,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    structured = prefilled(fake)[-1].sampling_params.structured
    assert structured is not None and structured.kind == "json_schema"
    assert json.loads(structured.spec)["properties"] == {"city": {"type": "string"}}
    # the fake echoes its prompt, which is no call: given back as content
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content


# -- streams that end badly ------------------------------------------------------------------


def test_a_worker_failure_mid_stream_is_an_error_event_without_done() -> None:
    cluster = FakeCluster(disaggregated(step_s=0.02))
    try:
        body = {"model": "fake", "messages": CHAT, "max_tokens": 300, "stream": True}
        with httpx.stream("POST", f"{cluster.base_url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = (line for line in r.iter_lines() if line.startswith("data: "))
            json.loads(next(lines)[6:])
            cluster.workers["decode"].fail(FailMode.RAISE)
            rest = [line[6:] for line in lines]
        assert rest and rest[-1] != "[DONE]" and "[DONE]" not in rest
        error = json.loads(rest[-1])["error"]
        assert error["type"] == "service_unavailable_error"
    finally:
        cluster.close()


def test_the_deadline_mid_stream_ends_every_choice(fake: FakeCluster) -> None:
    body = {"model": "fake", "messages": CHAT, "max_tokens": 400, "n": 2, "stream": True}
    headers = {"x-tandem-timeout-s": "0.3", "x-request-id": "late"}
    with httpx.stream(
        "POST", f"{fake.base_url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status_code == 200
        events = data_events(response)
    error = json.loads(events[-1])["error"]
    assert error["type"] == "timeout_error" and "[DONE]" not in events
    decode = fake.workers["decode"]  # the aborts go out in the background

    def aborted() -> bool:
        return {"late-0", "late-1"} <= {a.rsplit("#", 1)[0] for a in decode.aborts}

    assert until(aborted) and fake.num_active() == 0


def test_health_tokenize_and_detokenize(fake: FakeCluster) -> None:
    assert httpx.get(f"{fake.base_url}/health").json() == {"status": "serving"}
    tokens = post(fake, "/tokenize", {"model": "fake", "prompt": "hi"}).json()
    assert tokens == {"tokens": [104, 105], "count": 2, "max_model_len": 512}
    chat = post(fake, "/tokenize", {"messages": CHAT}).json()
    assert chat["count"] == len("user: hello there\nassistant: ")
    assert post(fake, "/detokenize", {"tokens": [104, 105]}).json() == {"prompt": "hi"}
    assert post(fake, "/detokenize", {"tokens": [10**6]}).json()["error"]["param"] == "tokens"
    assert post(fake, "/tokenize", {"model": "other", "prompt": "x"}).status_code == 404


# -- a client that leaves ----------------------------------------------------------------------


def test_a_client_that_leaves_mid_stream_is_aborted_at_once(fake: FakeCluster) -> None:
    """starlette cancels the streaming task on the disconnect; the flows' aclosing aborts the
    request on both workers long before its 400 tokens (4 s) would have ended it."""
    body = {"model": "fake", "messages": CHAT, "max_tokens": 400, "stream": True}
    started = time.monotonic()
    with httpx.stream(
        "POST",
        f"{fake.base_url}/v1/chat/completions",
        json=body,
        headers={"x-request-id": "leaver"},
    ) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
    decode, prefill = fake.workers["decode"], fake.workers["prefill"]

    def aborted() -> bool:
        return any(a.startswith("leaver#") for a in decode.aborts) and fake.num_active() == 0

    assert until(aborted, timeout_s=2.0) and time.monotonic() - started < 2.0
    assert decode.num_free_blocks == decode.num_total_blocks
    assert prefill.leases == {}


def test_a_client_that_leaves_a_plain_request_is_aborted(fake: FakeCluster) -> None:
    body = {"model": "fake", "messages": CHAT, "max_tokens": 400}
    headers = {"x-request-id": "impatient"}
    with pytest.raises(httpx.ReadTimeout):
        post(fake, "/v1/chat/completions", body, headers=headers, timeout=0.3)
    decode = fake.workers["decode"]
    assert until(lambda: any(a.startswith("impatient#") for a in decode.aborts))
    assert until(lambda: fake.num_active() == 0)


def test_a_failing_choice_ends_its_siblings(fake: FakeCluster) -> None:
    """Choice 1's id is taken by a running request (409): choice 0, already started, is
    cancelled with it, and only the running request stays active."""
    running = {"model": "fake", "messages": CHAT, "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST",
        f"{fake.base_url}/v1/chat/completions",
        json=running,
        headers={"x-request-id": "dup-1"},
    ) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)  # (kept: a dropped line iterator closes the response)
        body = {"model": "fake", "messages": CHAT, "max_tokens": 300, "n": 2}
        clash = post(fake, "/v1/chat/completions", body, headers={"x-request-id": "dup"})
        assert clash.status_code == 409
        assert clash.json()["error"]["code"] == "duplicate_request_id"
        assert until(lambda: fake.num_active() == 1)
    assert until(lambda: fake.num_active() == 0)
