"""The OpenAI-compatible HTTP API over one engine.

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models             GET  /health           GET  /metrics

Every request passes, in order: auth, validation (400 in the OpenAI error shape),
the model check (404), the context check (400 with the numbers), backpressure (429
with Retry-After), the response caches, then the engine. A client that disconnects
cancels its request; a request past the timeout ends with an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmopt.config import ServerConfig
from llmopt.engine.async_engine import AsyncEngine, GenerationError
from llmopt.errors import LlmoptError
from llmopt.server.embedder import MiniLMEmbedder
from llmopt.server.generation import ChoiceResult, Event, Job, RequestTimeout, replay, run_jobs
from llmopt.server.metrics import CONTENT_TYPE, ServerMetrics
from llmopt.server.openai_format import (
    ChatFormatter,
    CompletionFormatter,
    Formatter,
    sse,
    usage,
)
from llmopt.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    cache_key_text,
)
from llmopt.server.response_cache import ResponseCache, digest

CACHE_HEADER = "X-Llmopt-Cache"  # hit-exact | hit-semantic | miss | off


class _CacheQuery:
    """A request's cache identity: exact key, and for the semantic cache the context
    (everything but the last message) and the text to embed (the last message)."""

    def __init__(self, context: Any, query_text: str) -> None:
        self.context = digest(cache_key_text(context))
        self.key = digest(cache_key_text([context, query_text]))
        self.query_text = query_text


class Server:
    def __init__(
        self, engine: AsyncEngine, config: ServerConfig, embedder: MiniLMEmbedder | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.metrics = ServerMetrics(self.engine.load)
        self.cache: ResponseCache[list[ChoiceResult]] = ResponseCache(
            config.cache_max_entries,
            config.cache_ttl_s,
            config.semantic_threshold if embedder is not None else None,
        )
        self.embedder = embedder

    # -- checks -------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(
                404,
                f"model '{model}' is not served here; this server serves "
                f"'{self.config.model_name}'",
                param="model",
                code="model_not_found",
            )

    def check_fits(self, prompts_ids: list[list[int]], max_tokens: int | None) -> None:
        for ids in prompts_ids:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            try:
                self.engine.check_fits(len(ids), max_tokens)
            except LlmoptError as e:
                raise APIError(
                    400, e.message, param="max_tokens", code="context_length_exceeded"
                ) from None

    def check_capacity(self, num_jobs: int) -> None:
        waiting = self.engine.load().waiting
        if waiting + num_jobs > self.config.max_queue:
            raise APIError(
                429,
                f"the server is busy: {waiting} requests are waiting "
                f"(queue bound {self.config.max_queue}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )

    # -- caches -------------------------------------------------------------------------

    async def lookup(
        self, req: ChatCompletionRequest | CompletionRequest, q: _CacheQuery
    ) -> tuple[str, list[ChoiceResult] | None, Any]:
        """(header value, cached results or None, the query's embedding if computed)."""
        if not (self.config.response_cache and req.cache and req.deterministic):
            return "off", None, None
        hit = self.cache.get_exact(q.key)
        self.metrics.response_cache.labels("exact", "hit" if hit else "miss").inc()
        if hit is not None:
            return "hit-exact", hit, None
        if not self.cache.semantic_enabled or self.embedder is None:
            return "miss", None, None
        embedding = await self.embedder.aembed(q.query_text)
        hit = self.cache.get_semantic(q.context, embedding)
        self.metrics.response_cache.labels("semantic", "hit" if hit else "miss").inc()
        return ("hit-semantic" if hit else "miss"), hit, embedding

    # -- generation ---------------------------------------------------------------------

    async def events(
        self,
        endpoint: str,
        jobs: list[Job],
        results: list[ChoiceResult],
        cached: list[ChoiceResult] | None,
        store: Callable[[list[ChoiceResult]], None] | None,
    ) -> AsyncIterator[Event]:
        """The request's events, live or replayed from the cache, recorded in `results`.
        A live answer that completes is handed to `store` (when caching applies)."""
        if cached is not None:
            source: AsyncIterator[Event] = _aiter(replay(cached))
        else:
            source = run_jobs(
                self.engine, jobs, self.config.request_timeout_s, self.metrics.observe_generation
            )
        outcome = "cancelled"
        try:
            async for i, delta in source:
                results[i].deltas.append(delta)
                yield i, delta
            outcome = "ok"
            if store is not None and cached is None:
                store(results)
        except RequestTimeout:
            outcome = "timeout"
            raise
        except GenerationError:
            outcome = "error"
            raise
        finally:
            self.metrics.requests.labels(endpoint, outcome).inc()

    async def respond(
        self,
        endpoint: str,
        req: ChatCompletionRequest | CompletionRequest,
        request: Request,
        prompts_ids: list[list[int]],
        q: _CacheQuery,
        fmt: Formatter,
        render: Callable[[list[ChoiceResult], dict[str, Any]], dict[str, Any]],
        chunks: Callable[[AsyncIterator[Event]], AsyncIterator[dict[str, Any]]],
    ) -> Response:
        req.refuse_unsupported()
        self.check_model(req.model)
        limit = req.token_limit
        self.check_fits(prompts_ids, limit)
        jobs = [
            Job(ids, req.sampling(limit, req.num_logprobs, seed_offset=j))
            for ids in prompts_ids
            for j in range(req.n)
        ]
        header, cached, embedding = await self.lookup(req, q)
        if cached is None:
            self.check_capacity(len(jobs))

        def store(results: list[ChoiceResult]) -> None:
            if header == "miss" and all(r.finish_reason in ("stop", "length") for r in results):
                self.cache.put(q.key, results, q.context, embedding)

        results = [ChoiceResult() for _ in jobs]
        events = self.events(endpoint, jobs, results, cached, store)
        prompt_lens = [len(ids) for ids in prompts_ids]
        headers = {CACHE_HEADER: header}
        if req.stream:
            body = _sse_body(chunks(events), fmt, results, prompt_lens, req.include_usage)
            return StreamingResponse(body, media_type="text/event-stream", headers=headers)
        if not await _collect_unless_disconnected(events, request):
            return Response(status_code=499)  # nobody is listening; nginx's "client closed"
        return JSONResponse(render(results, usage(results, prompt_lens)), headers=headers)


async def _aiter(items: list[Event]) -> AsyncIterator[Event]:
    for item in items:
        yield item


async def _sse_body(
    chunks: AsyncIterator[dict[str, Any]],
    fmt: Formatter,
    results: list[ChoiceResult],
    prompt_lens: list[int],
    include_usage: bool,
) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield sse(chunk)
        if include_usage:
            yield sse(fmt.usage_chunk(usage(results, prompt_lens)))
    except RequestTimeout as e:
        yield sse(APIError(504, str(e), type="timeout_error").body())
    except GenerationError as e:
        yield sse(APIError(500, str(e), type="server_error").body())
    yield sse("[DONE]")


async def _collect_unless_disconnected(events: AsyncIterator[Event], request: Request) -> bool:
    """Consume the events; return False, having cancelled generation, if the client
    went away first. A timeout or a generation error is raised."""

    async def consume() -> None:
        async for _ in events:
            pass

    async def disconnected() -> None:
        # The body has been read: the next message is the client going away.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()  # also when this handler itself is cancelled
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return False
    work.result()
    return True


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
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            # compare_digest takes the same time wherever the strings differ
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                return _error_response(
                    APIError(
                        401,
                        "a valid API key is required: Authorization: Bearer KEY",
                        type="authentication_error",
                        code="invalid_api_key",
                    )
                )
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

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        messages = req.chat_messages()
        ids = server.tokenizer.encode_chat(messages)
        fmt = ChatFormatter(server.config.model_name, server.tokenizer)
        with_lp = req.logprobs
        context = ["chat", server.config.model_name, req.cache_params(), messages[:-1]]
        query = _CacheQuery(context, f"{messages[-1]['role']}: {messages[-1]['content']}")

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
        query = _CacheQuery(context, texts[-1])

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
