"""The OpenAI-compatible HTTP API over one engine.

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models             GET  /health           GET  /metrics
    GET  /v1/status             (per model: loaded, requests running and waiting, KV use;
                                 what the router's model-aware policy reads)

Every request passes, in order: auth, validation (400 in the OpenAI error shape),
the model check (404), the context check (400 with the numbers), backpressure (429
with Retry-After), the response caches, then the engine. A client that disconnects
cancels its request; a request past the timeout ends with an error.
"""

from __future__ import annotations

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
from llmopt.server.openai_format import (
    ChatFormatter,
    CompletionFormatter,
)
from llmopt.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
)
from llmopt.server.service import CacheQuery, Server


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
        yield
        server.engine.shutdown()  # after uvicorn has drained in-flight requests

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
        return {
            "object": "list",
            "data": [
                {
                    "id": server.config.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "llmopt",
                    "max_model_len": server.engine.max_context,
                }
            ],
        }

    @app.get("/v1/status")
    async def status() -> dict[str, Any]:
        s = server.engine.load()
        tokens = s.kv_block_size
        model = {
            "id": server.config.model_name,
            "loaded": True,
            "running": s.running,
            "waiting": s.waiting,
            "kv_cache_tokens_used": s.kv_blocks_used * tokens,
            "kv_cache_tokens_total": s.kv_blocks_total * tokens,
            "prefix_cache_hit_tokens": s.prefix_hit_tokens,
            "prefix_cache_miss_tokens": s.prefix_miss_tokens,
        }
        # One model, always loaded: no slots to count (None), as the router reads it.
        return {"object": "status", "models": [model], "max_loaded_models": None}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        messages = req.chat_messages()
        ids = server.tokenizer.encode_chat(messages)
        fmt = ChatFormatter(server.config.model_name, server.tokenizer)
        with_lp = req.logprobs
        context = ["chat", server.config.model_name, req.cache_params(), messages[:-1]]
        query = CacheQuery(context, f"{messages[-1]['role']}: {messages[-1]['content']}")

        async def chunks(events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
            for i in range(req.n):
                yield fmt.role_chunk(i)
            async for i, d in events:
                yield fmt.chunk(i, d, with_lp)

        return await server.respond(
            "chat",
            req,
            request,
            [ids],
            query,
            fmt,
            lambda results, u: fmt.response(results, u, with_lp),
            chunks,
        )

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        tok = server.tokenizer
        prompts = req.prompts()
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
        fmt = CompletionFormatter(server.config.model_name, tok)
        with_lp = req.logprobs is not None
        context = ["completion", server.config.model_name, req.cache_params(), texts[:-1]]
        query = CacheQuery(context, texts[-1])

        async def chunks(events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
            started: set[int] = set()
            async for i, d in events:
                text = d.text if i in started else echoes[i] + d.text
                started.add(i)
                yield fmt.chunk(i, text, d, with_lp)

        return await server.respond(
            "completion",
            req,
            request,
            prompts_ids,
            query,
            fmt,
            lambda results, u: fmt.response(results, u, with_lp, echoes),
            chunks,
        )

    return app
