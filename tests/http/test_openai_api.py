"""The OpenAI-compatible HTTP API through the official `openai` client, on the real model.

One disaggregated cluster for the module (SmolLM2-135M-Instruct on CPU: one prefill and one
decode worker on Ray, the router in this process with its HTTP door on 127.0.0.1, any free
port). Checked: chat and completions, streamed and not, n, logprobs, stop, seeds, usage equal to
the tokens produced, cached tokens, the error statuses a real cluster gives (400, 404, 429 with
Retry-After, 504), and that a client that leaves mid-stream frees its KV on both pools.
Skipped when the `demo` extra (the model package) is missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.real_model import skip_without_model

skip_without_model()

import httpx2 as httpx  # noqa: E402  (the HTTP client the openai package uses)
import jsonschema  # noqa: E402
import openai  # noqa: E402

from tandem.cluster import ClusterConfig  # noqa: E402
from tests.cluster.cluster_harness import ClusterThread  # noqa: E402

# The "batch" class: these tests are about the API, not admission (a busy CPU can predict a TPOT
# over the default class's 100 ms and rightly refuse). Sent as a header, which also checks it.
HEADERS = {"x-tandem-slo-class": "batch"}
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
LONG_RUN = {"max_tokens": 1000, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterThread]:
    config = ClusterConfig(
        model="demo",
        num_prefill=1,
        num_decode=1,
        engine_kwargs={"device": "cpu", "dtype": "float32"},
        http_port=0,
    )
    c = ClusterThread(config)
    yield c
    c.close()


@pytest.fixture(scope="module")
def base_url(cluster: ClusterThread) -> str:
    address = cluster.cluster.http_address
    assert address is not None and address.startswith("http://127.0.0.1:")
    return address


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="unused", default_headers=HEADERS, max_retries=0
    )


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def num_active(cluster: ClusterThread) -> int:
    async def count() -> int:
        assert cluster.cluster.server is not None
        return cluster.cluster.server.orchestrator.num_active

    return cluster.run(count())


# -- the happy paths -----------------------------------------------------------------------


def test_models_lists_the_served_model(client: openai.OpenAI, base_url: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["demo"]
    card = httpx.get(f"{base_url}/v1/models").json()["data"][0]
    assert card["max_model_len"] > 0 and card["owned_by"] == "tandem"


def test_capital_of_france_greedy_with_usage_of_the_tokens_produced(
    client: openai.OpenAI, model: str
) -> None:
    out = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=32, logprobs=True, top_logprobs=2
    )
    choice = out.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None and choice.logprobs is not None
    entries = choice.logprobs.content
    assert out.usage.completion_tokens == len(entries)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    for entry in entries:  # greedy: the sampled token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
    assert "".join(e.token for e in entries).strip().startswith(choice.message.content[:5])


def test_streamed_chat_equals_plain_and_counts_its_tokens(
    client: openai.OpenAI, model: str, base_url: str
) -> None:
    plain = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=model,
        messages=FRANCE,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == plain.choices[0].message.content
    num_tokens = sum(len(c.choices[0].logprobs.content) for c in chunks[:-1])
    assert usage.completion_tokens == num_tokens == plain.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    prompt = httpx.post(f"{base_url}/tokenize", json={"messages": FRANCE}).json()
    assert usage.prompt_tokens == prompt["count"] == plain.usage.prompt_tokens


def test_completions_plain_streamed_and_several_prompts(
    client: openai.OpenAI, model: str, base_url: str
) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8)
    streamed = list(
        client.completions.create(
            model=model, prompt=prompt, temperature=0, max_tokens=8, stream=True
        )
    )
    assert all(c.object == "text_completion" for c in streamed)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    ids = httpx.post(f"{base_url}/tokenize", json={"prompt": prompt}).json()["tokens"]
    both = client.completions.create(
        model=model, prompt=[ids, ids], temperature=0, max_tokens=8, logprobs=1, echo=False
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == both.choices[1].text == plain.choices[0].text
    assert both.usage.prompt_tokens == 2 * len(ids)
    assert both.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in both.choices)
    echoed = client.completions.create(
        model=model, prompt=prompt, temperature=0, max_tokens=4, echo=True
    )
    assert echoed.choices[0].text.startswith(prompt)


def test_n_choices_with_seeds_reproduce(client: openai.OpenAI, model: str) -> None:
    def sample() -> list[str]:
        out = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me a story."}],
            temperature=1.0,
            seed=1234,
            n=2,
            max_tokens=16,
        )
        assert [c.index for c in out.choices] == [0, 1]
        assert out.usage.completion_tokens == 32 or any(
            c.finish_reason == "stop" for c in out.choices
        )
        return [c.message.content for c in out.choices]

    first = sample()
    assert sample() == first  # same seed, temperature 1: the same text
    assert first[0] != first[1]  # choice i samples with seed + i


def test_stop_string_ends_the_text(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=FRANCE, temperature=0, max_tokens=32, stop=["Paris"]
    )
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and "Paris" not in choice.message.content


def test_repeated_long_prompt_reports_cached_tokens(client: openai.OpenAI, model: str) -> None:
    prompt = " ".join(f"Item {i} is a small blue box." for i in range(12))
    usages = [
        client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0).usage
        for _ in range(2)
    ]
    assert usages[0].prompt_tokens > 64  # a few whole KV blocks
    assert usages[1].prompt_tokens_details.cached_tokens > 0


# -- errors ----------------------------------------------------------------------------------


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    return exc.response.json()["error"]


def test_400_names_the_field(client: openai.OpenAI, model: str, base_url: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=FRANCE, temperature=-1)
    assert _error(bad.value)["param"] == "temperature"
    missing = httpx.post(f"{base_url}/v1/chat/completions", json={"model": model})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    max_model_len = httpx.get(f"{base_url}/v1/models").json()["data"][0]["max_model_len"]
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=model, prompt=[1] * max_model_len, max_tokens=1)
    assert _error(long.value)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as header:
        client.chat.completions.create(
            model=model, messages=FRANCE, extra_headers={"x-tandem-ttft-ms": "-5"}
        )
    assert _error(header.value)["param"] == "x-tandem-ttft-ms"


def test_404_for_an_unknown_model_and_route(client: openai.OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert _error(unknown.value)["param"] == "model"
    route = httpx.post(f"{base_url}/v1/embeddings", json={})
    assert route.status_code == 404 and route.json()["error"]["type"] == "not_found_error"


def test_429_with_retry_after_when_no_worker_meets_the_slo(
    client: openai.OpenAI, model: str, cluster: ClusterThread
) -> None:
    for stream in (False, True):  # a stream is refused before it starts, with the same status
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(
                model=model,
                messages=FRANCE,
                stream=stream,
                extra_body={"ttft_ms": 0.001, "best_effort": False},
            )
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert _error(refused.value)["code"] == "slo_infeasible"
    assert cluster.wait_all_free()


def test_504_when_the_deadline_passes(
    client: openai.OpenAI, model: str, cluster: ClusterThread
) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as late:
        client.chat.completions.create(
            model=model, messages=FRANCE, extra_headers={"x-tandem-timeout-s": "0.5"}, **LONG_RUN
        )
    assert late.value.status_code == 504 and time.monotonic() - started < 5.0
    assert until(lambda: num_active(cluster) == 0 and cluster.all_blocks_free())


# -- a client that leaves ---------------------------------------------------------------------


def test_disconnect_mid_stream_frees_both_pools(
    cluster: ClusterThread, base_url: str, model: str
) -> None:
    body = {
        "model": model,
        "messages": FRANCE,
        "stream": True,
        "max_tokens": 1000,
        "ignore_eos": True,
    }
    assert cluster.wait_all_free()
    with httpx.Client(base_url=base_url, headers=HEADERS, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(3):
                chunk = json.loads(next(events)[len("data: ") :])
                assert chunk["object"] == "chat.completion.chunk"
            assert until(lambda: not cluster.all_blocks_free())  # KV held on the workers
    # leaving the block closed the connection mid-stream
    assert until(lambda: num_active(cluster) == 0 and cluster.all_blocks_free())


def test_disconnect_while_waiting_for_a_plain_response(
    cluster: ClusterThread, base_url: str, model: str
) -> None:
    body = {"model": model, "messages": FRANCE, "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=HEADERS, timeout=1.0)
    assert until(lambda: num_active(cluster) == 0 and cluster.all_blocks_free())


def test_http_requests_show_in_the_router_metrics(base_url: str) -> None:
    text = httpx.get(f"{base_url}/metrics").text
    finished = [
        line
        for line in text.splitlines()
        if line.startswith("tandem_requests_finished_total") and 'finish_reason="length"' in line
    ]
    assert finished and float(finished[0].rsplit(" ", 1)[1]) > 0
    assert 'tandem_requests_rejected_total{model="demo",reason="slo_infeasible"}' in text


# -- structured output and tools -------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_json_schema_response_format_is_followed(client: openai.OpenAI, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model=model,
        messages=FRANCE,
        temperature=0,
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_a_named_tool_choice_gives_a_tool_call(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        temperature=0,
        max_tokens=48,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}
