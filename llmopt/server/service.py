"""What the HTTP API does for one request: the lease on its model (model_manager.py),
the context and capacity checks, the exact and semantic response caches, and
generation as events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmopt.config import ServerConfig
from llmopt.engine.async_engine import GenerationError
from llmopt.errors import LlmoptError
from llmopt.openai_wire import APIError, sse
from llmopt.server.embedder import MiniLMEmbedder
from llmopt.server.generation import ChoiceResult, Event, Job, RequestTimeout, replay, run_jobs
from llmopt.server.metrics import ServerMetrics
from llmopt.server.model_manager import Lease, ModelManager
from llmopt.server.openai_format import Formatter, usage
from llmopt.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    cache_key_text,
)
from llmopt.server.response_cache import ResponseCache, digest

CACHE_HEADER = "X-Llmopt-Cache"  # hit-exact | hit-semantic | miss | off


class CacheQuery:
    """A request's cache identity: exact key, and for the semantic cache the context
    (everything but the last message) and the text to embed (the last message)."""

    def __init__(self, context: Any, query_text: str) -> None:
        self.context = digest(cache_key_text(context))
        self.key = digest(cache_key_text([context, query_text]))
        self.query_text = query_text


class Prepared(NamedTuple):
    """A request made ready for its model: its prompts' ids, cache identity, and how
    its answer is rendered (whole, or as stream chunks from its events)."""

    prompts_ids: list[list[int]]
    query: CacheQuery
    fmt: Formatter
    render: Callable[[list[ChoiceResult], dict[str, Any]], dict[str, Any]]
    chunks: Callable[[AsyncIterator[Event]], AsyncIterator[dict[str, Any]]]


class Server:
    def __init__(
        self, models: ModelManager, config: ServerConfig, embedder: MiniLMEmbedder | None = None
    ) -> None:
        self.models = models
        self.config = config
        self.metrics = ServerMetrics(models)
        self.cache: ResponseCache[list[ChoiceResult]] = ResponseCache(
            config.cache_max_entries,
            config.cache_ttl_s,
            config.semantic_threshold if embedder is not None else None,
        )
        self.embedder = embedder

    # -- checks -------------------------------------------------------------------------

    @staticmethod
    def check_fits(lease: Lease, prompts_ids: list[list[int]], max_tokens: int | None) -> None:
        for ids in prompts_ids:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            try:
                lease.engine.check_fits(len(ids), max_tokens)
            except LlmoptError as e:
                raise APIError(
                    400, e.message, param="max_tokens", code="context_length_exceeded"
                ) from None

    def check_capacity(self, lease: Lease, num_jobs: int) -> None:
        waiting = lease.engine.load().waiting
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
        self, req: ChatCompletionRequest | CompletionRequest, q: CacheQuery
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
        lease: Lease,
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
                lease.engine, jobs, self.config.request_timeout_s, self.metrics.observe_generation
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
        prepare: Callable[[Lease], Prepared],
    ) -> Response:
        req.refuse_unsupported()
        lease = await self.models.acquire(req.model, self.config.request_timeout_s)
        streaming = False
        try:
            p = prepare(lease)
            limit = req.token_limit
            self.check_fits(lease, p.prompts_ids, limit)
            jobs = [
                Job(ids, req.sampling(limit, req.num_logprobs, seed_offset=j))
                for ids in p.prompts_ids
                for j in range(req.n)
            ]
            header, cached, embedding = await self.lookup(req, p.query)
            if cached is None:
                self.check_capacity(lease, len(jobs))

            def store(results: list[ChoiceResult]) -> None:
                if header == "miss" and all(r.finish_reason in ("stop", "length") for r in results):
                    self.cache.put(p.query.key, results, p.query.context, embedding)

            results = [ChoiceResult() for _ in jobs]
            events = self.events(endpoint, lease, jobs, results, cached, store)
            prompt_lens = [len(ids) for ids in p.prompts_ids]
            headers = {CACHE_HEADER: header}
            if req.stream:
                body = _sse_body(p.chunks(events), p.fmt, results, prompt_lens, req.include_usage)
                streaming = True
                return _LeasedStream(body, lease, headers)
            if not await _collect_unless_disconnected(events, request):
                return Response(status_code=499)  # nobody is listening; nginx's "client closed"
            return JSONResponse(p.render(results, usage(results, prompt_lens)), headers=headers)
        finally:
            if not streaming:
                lease.release()


class _LeasedStream(StreamingResponse):
    """An event stream that ends its model's lease once sent, or once the client has
    gone: also when its body never started (the client left before the headers)."""

    def __init__(self, body: AsyncIterator[str], lease: Lease, headers: dict[str, str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.lease.release()


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
