"""The router's OpenAI-compatible HTTP API over its replicas.

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models (the union of the replicas')      GET /health   GET /metrics

A request passes: the router's own auth (401), a JSON check (400), the model check
(404 with the models served), then the policy and the replicas (503 with Retry-After
when none is healthy). Errors are answered in the OpenAI shape, never as a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmopt.openai_wire import APIError, authorized, unauthorized
from llmopt.router.config import RouterConfig
from llmopt.router.metrics import RouterMetrics
from llmopt.router.policies import make_policy
from llmopt.router.proxy import Router
from llmopt.router.replicas import Fleet
from llmopt.router.request_view import read_request


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def add_error_handlers(app: FastAPI) -> None:
    """OpenAI-style error bodies for the app's APIErrors and Starlette's own HTTP errors
    (an unknown route: 404 not_found_error); the router's app and the cluster's ingress."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))


def create_app(config: RouterConfig) -> FastAPI:
    policy = make_policy(config.policy)
    timeout = httpx.Timeout(config.request_timeout_s, connect=config.connect_timeout_s)
    # No pool limit: the router holds one connection per request in flight.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    client = httpx.AsyncClient(timeout=timeout, limits=limits)
    fleet = Fleet(config, client)
    metrics = RouterMetrics(policy.name, lambda: [r.state for r in fleet.replicas])
    router = Router(config, fleet, policy, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await fleet.check_all()  # route from the first request on
        checks = asyncio.create_task(fleet.keep_checking())
        yield
        checks.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await checks
        await client.aclose()

    app = FastAPI(title="llmopt router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.router = router

    add_error_handlers(app)

    @app.middleware("http")
    async def _auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        given = request.headers.get("authorization", "")
        if request.url.path != "/health" and not authorized(given, config.api_key):
            return _error_response(unauthorized())
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        up = len(fleet.healthy())
        body = {"status": "ok" if up else "unavailable", "healthy_replicas": up}
        return JSONResponse(body, status_code=200 if up else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": fleet.models()}

    async def forward(request: Request) -> Response:
        raw = await request.body()
        path = request.url.path
        view = read_request(path, raw)
        return await router.forward(path, raw, view, request.headers.get("authorization"))

    app.post("/v1/chat/completions")(forward)
    app.post("/v1/completions")(forward)
    return app
