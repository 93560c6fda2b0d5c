"""The OpenAI-compatible HTTP API over one or several models, each in an engine of its
own (model_manager.py).

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models             GET  /health           GET  /metrics
    GET  /v1/status             (per model: loaded, requests running and waiting, KV use,
                                 bytes held; what the router's model-aware policy reads)

Every request passes, in order: auth, validation (400 in the OpenAI error shape),
the model check (404), its model's load (503 with Retry-After if it cannot fit), the
context check (400 with the numbers), backpressure (429 with Retry-After), the
response caches, then the engine. A client that disconnects
cancels its request; a request past the timeout ends with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmopt.engine.async_engine import GenerationError
from llmopt.errors import LlmoptError
from llmopt.openai_wire import APIError, authorized, unauthorized
from llmopt.server.generation import Event, RequestTimeout
from llmopt.server.metrics import CONTENT_TYPE
from llmopt.server.model_manager import Lease, ServedModel
from llmopt.server.openai_format import (
    ChatFormatter,
    CompletionFormatter,
)
from llmopt.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from llmopt.server.service import CacheQuery, Prepared, Server


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _validation_message(e: RequestValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(loc)
    return (f"{where}: {err.get('msg')}" if where else str(err.get("msg"))), where or None


def create_app(server: Server) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        models = server.models
        reaper = (
            asyncio.create_task(models.keep_alive()) if models.keep_alive_s is not None else None
        )
        yield
        if reaper is not None:
            reaper.cancel()
        models.shutdown()  # after uvicorn has drained in-flight requests

    app = FastAPI(title="llmopt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    api_key = server.config.api_key

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(LlmoptError)
    async def _user_error(_: Request, e: LlmoptError) -> JSONResponse:
        return _error_response(APIError(400, e.message))

    @app.exception_handler(GenerationError)
    async def _generation_error(_: Request, e: GenerationError) -> JSONResponse:
        return _error_response(APIError(500, str(e), type="server_error"))

    @app.exception_handler(RequestTimeout)
    async def _timeout(_: Request, e: RequestTimeout) -> JSONResponse:
        return _error_response(APIError(504, str(e), type="timeout_error"))

    @app.middleware("http")
    async def _auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get("authorization", "")
        if request.url.path != "/health" and not authorized(given, api_key):
            return _error_response(unauthorized())
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_card(m) for m in server.models.models.values()]}

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        # Least recently used first: the order in which the router expects evictions.
        ordered = sorted(server.models.models.values(), key=lambda m: m.last_used)
        return {
            "object": "status",
            "models": [_model_status(m) for m in ordered],
            "max_loaded_models": server.models.max_loaded(),  # None: all always loaded
            "memory_budget_bytes": server.models.budget_bytes,
            "memory_held_bytes": server.models.held_bytes(),
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        messages = req.chat_messages()
        with_lp = req.logprobs

        def prepare(model: Lease) -> Prepared:
            fmt = ChatFormatter(model.name, model.tokenizer)
            context = ["chat", model.name, req.cache_params(), messages[:-1]]
            query = CacheQuery(context, f"{messages[-1]['role']}: {messages[-1]['content']}")

            async def chunks(events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
                for i in range(req.n):
                    yield fmt.role_chunk(i)
                async for i, d in events:
                    yield fmt.chunk(i, d, with_lp)

            return Prepared(
                [model.tokenizer.encode_chat(messages)],
                query,
                fmt,
                lambda results, u: fmt.response(results, u, with_lp),
                chunks,
            )

        return await server.respond("chat", req, request, prepare)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        prompts = req.prompts()
        with_lp = req.logprobs is not None

        def prepare(model: Lease) -> Prepared:
            tok = model.tokenizer
            prompts_ids = []
            for p in prompts:
                if isinstance(p, str):
                    prompts_ids.append(tok.encode(p))
                elif any(t < 0 or t >= tok.vocab_size for t in p):
                    raise APIError(
                        400, f"prompt token ids must be in [0, {tok.vocab_size})", param="prompt"
                    )
                else:
                    prompts_ids.append(p)
            texts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
            echoes = [texts[j // req.n] if req.echo else "" for j in range(len(prompts) * req.n)]
            fmt = CompletionFormatter(model.name, tok)
            context = ["completion", model.name, req.cache_params(), texts[:-1]]

            async def chunks(events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
                started: set[int] = set()
                async for i, d in events:
                    text = d.text if i in started else echoes[i] + d.text
                    started.add(i)
                    yield fmt.chunk(i, text, d, with_lp)

            return Prepared(
                prompts_ids,
                CacheQuery(context, texts[-1]),
                fmt,
                lambda results, u: fmt.response(results, u, with_lp, echoes),
                chunks,
            )

        return await server.respond("completion", req, request, prepare)

    return app


def _card(m: ServedModel) -> dict[str, Any]:
    """Its /v1/models entry; "loaded" and max_model_len (once known) are llmopt's own."""
    card = {"id": m.name, "object": "model", "created": 0, "owned_by": "llmopt"}
    if m.max_context is not None:
        card["max_model_len"] = m.max_context
    return {**card, "loaded": m.engine is not None}


def _model_status(m: ServedModel) -> dict[str, Any]:
    s = m.engine.load() if m.engine is not None else None
    tokens = s.kv_block_size if s else 0
    return {
        "id": m.name,
        "loaded": s is not None,
        "running": s.running if s else 0,
        "waiting": s.waiting if s else 0,
        "kv_cache_tokens_used": s.kv_blocks_used * tokens if s else 0,
        "kv_cache_tokens_total": s.kv_blocks_total * tokens if s else 0,
        "prefix_cache_hit_tokens": s.prefix_hit_tokens if s else 0,
        "prefix_cache_miss_tokens": s.prefix_miss_tokens if s else 0,
        "prefix_cache_tokens": s.prefix_cached_blocks * tokens if s else 0,
        "bytes": m.bytes,  # measured once loaded, estimated before
        "in_flight": m.in_flight,
        "loads": m.loads,
    }
