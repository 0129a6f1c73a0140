"""The OpenAI-compatible HTTP API of the router: a FastAPI app over the router's request flow.

`create_app(config, tokenizer, registry, orchestrator, metrics)` serves, in the router's own
event loop and beside the gRPC door (router/server.py starts it with uvicorn):

| route                       | what                                                        |
| --------------------------- | ----------------------------------------------------------- |
| POST /v1/chat/completions   | chat; streamed as `chat.completion.chunk` events            |
| POST /v1/completions        | text or token-id prompts (several: several choices)        |
| GET  /v1/models             | the served model                                            |
| POST /tokenize, /detokenize | vLLM's shapes: {tokens, count, max_model_len} / {prompt}   |
| GET  /health                | 200 while the registry can serve and the router is not      |
|                             | draining, else 503 (no key needed)                          |
| GET  /metrics               | the router's Prometheus registry (no key needed)            |

Every other route needs `authorization: Bearer <RouterConfig.api_key>` when a key is set
(`router.auth.authorized`), else 401. Bodies over `RouterConfig.max_message_bytes` get 413
(router/http/body_limit.py). Every error is OpenAI's error object (router/http/errors.py).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.auth import HINT, INVALID_KEY, MISSING_KEY, authorized
from router.config import RouterConfig
from router.flow import Orchestrator
from router.http import requests, schemas
from router.http.body_limit import BodyLimit
from router.http.chat_tools import chat_turns, encode_chat
from router.http.door import Door
from router.http.errors import ApiError, install_handlers, invalid_fields
from router.http.responses import ChatFold, CompletionFold
from router.http.streaming import ChatChunks, CompletionChunks
from router.metrics import RouterMetrics
from router.registry import WorkerRegistry
from router.tokenizer import Tokenizer
from router.validation import MAX_CHARS_PER_TOKEN, ModelLimits, check_token_ids


def create_app(
    config: RouterConfig,
    tokenizer: Tokenizer,
    registry: WorkerRegistry,
    orchestrator: Orchestrator,
    metrics: RouterMetrics,
) -> FastAPI:
    vocab = config.vocab_size if config.vocab_size is not None else tokenizer.vocab_size
    model = requests.Model(config, tokenizer, ModelLimits(config.max_model_len, vocab))
    door = Door(model, orchestrator, metrics)
    app = FastAPI(title="Tandem", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=config.max_message_bytes)
    install_handlers(app, lambda request: _count_invalid(request, metrics))
    keyed = [Depends(_key_check(config))]
    _completion_routes(app, door, keyed)
    _model_routes(app, model, keyed)
    _service_routes(app, registry, orchestrator, metrics)
    return app


COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")


def _count_invalid(request: Request, metrics: RouterMetrics) -> None:
    """A completion body that does not parse counts as an invalid request, as an undecodable
    Generate does at the gRPC door."""
    if request.url.path in COMPLETION_ROUTES:
        metrics.reject_invalid()


def _key_check(config: RouterConfig) -> Any:
    async def require_key(request: Request) -> None:
        header = request.headers.get("authorization")
        if not authorized(header, config.api_key):
            reason = MISSING_KEY if header is None else INVALID_KEY
            raise ApiError(
                401,
                f"{reason}; {HINT}",
                param="authorization",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_key


def _completion_routes(app: FastAPI, door: Door, keyed: list[Any]) -> None:
    name = door.model.name

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(body: schemas.ChatCompletionRequest, request: Request) -> Response:
        try:
            prepared = requests.chat(body, request.headers, door.model)
        except ApiError as exc:
            raise door.rejected(exc) from None
        texts = door.texts if body.logprobs else None
        if body.stream:
            chunks = ChatChunks(prepared, name, body.include_usage, texts)
            return await door.stream(request, prepared, chunks)
        return await door.respond(request, prepared, ChatFold(prepared, name, texts))

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: schemas.CompletionRequest, request: Request) -> Response:
        try:
            prepared = requests.completion(body, request.headers, door.model)
        except ApiError as exc:
            raise door.rejected(exc) from None
        texts = door.texts if body.logprobs is not None else None
        echoes = requests.echo_texts(body, prepared, door.model) if body.echo else None
        if body.stream:
            chunks = CompletionChunks(prepared, name, body.include_usage, texts, echoes)
            return await door.stream(request, prepared, chunks)
        fold = CompletionFold(prepared, name, texts, echoes)
        return await door.respond(request, prepared, fold)


def _model_routes(app: FastAPI, model: requests.Model, keyed: list[Any]) -> None:
    created = int(time.time())

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        card = {
            "id": model.name,
            "object": "model",
            "created": created,
            "owned_by": "tandem",
            "root": model.name,
            "max_model_len": model.limits.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize(body: schemas.TokenizeRequest) -> dict[str, Any]:
        requests.check_model(body.model, model, required=False)
        with invalid_fields({"chat": "messages"}):
            ids = _tokenize(body, model)
        return {"tokens": ids, "count": len(ids), "max_model_len": model.limits.max_model_len}

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize(body: schemas.DetokenizeRequest) -> dict[str, Any]:
        requests.check_model(body.model, model, required=False)
        with invalid_fields():
            check_token_ids(body.tokens, model.limits, "tokens")
        return {"prompt": model.tokenizer.decode(body.tokens)}


def _tokenize(body: schemas.TokenizeRequest, model: requests.Model) -> list[int]:
    """The ids a completion (`prompt`) or a chat (`messages`) request would be served with.
    `add_special_tokens` is accepted; the model's special tokens are always added, as they
    are when serving."""
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "prompt: give prompt or messages", param="prompt")
    max_chars = model.limits.max_model_len * MAX_CHARS_PER_TOKEN
    if body.messages is not None:
        turns = chat_turns(body.messages)
        num_chars = sum(len(t.content) for t in turns)
        if num_chars > max_chars:
            raise ApiError(400, f"messages: over {max_chars} characters", param="messages")
        return encode_chat(model.tokenizer, turns, body.add_generation_prompt)
    assert body.prompt is not None
    if len(body.prompt) > max_chars:
        raise ApiError(400, f"prompt: over {max_chars} characters", param="prompt")
    return model.tokenizer.encode(body.prompt)


def _service_routes(
    app: FastAPI, registry: WorkerRegistry, orchestrator: Orchestrator, metrics: RouterMetrics
) -> None:
    @app.get("/health")
    async def health() -> Response:
        if orchestrator.draining:
            raise ApiError(503, "draining: the router is shutting down", code="unavailable")
        if not registry.serving:
            raise ApiError(503, "no healthy worker can serve requests", code="unavailable")
        return JSONResponse({"status": "serving"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
