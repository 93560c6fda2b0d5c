"""The cluster's OpenAI-compatible front: a Ray Serve ingress deployment that reads
each request and hands it to an engine replica through a deployment handle.

    POST /v1/chat/completions   POST /v1/completions   (streamed as SSE, or not)
    GET  /v1/models (one replica's)   GET /health   GET /metrics (the request router's)

With an API key, every route but /health needs it (401 first, as the router's).
The ingress reads what routing needs (router/request_view.py: the model, the prompt
text, estimated tokens) and passes it as the handle call's first argument, where the
request router finds it (request_router.py). It checks the JSON (400) and the model
(404), and leaves everything else to the replica, whose answer, head and body, it
passes through: a streamed answer event by event. A replica that fails before its
answer starts gets a 503 with Retry-After; one that fails mid-stream ends the stream
with an error event and `data: [DONE]`, as the router does.
"""

# No `from __future__ import annotations`: Ray Serve's ingress rebuilds the methods'
# signatures for FastAPI, which then cannot resolve string annotations (a Request
# parameter would be read as a query parameter, and every call refused with 422).
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from llmopt.cluster.asgi import Head
from llmopt.cluster.replica import REPLICA_HEADER
from llmopt.cluster.request_router import routers_metrics
from llmopt.cluster.routing import ANY_REQUEST
from llmopt.openai_wire import APIError, authorized, sse, unauthorized
from llmopt.router.app import add_error_handlers
from llmopt.router.request_view import RequestView, read_request

PASSED_HEADERS = {"content-type", "retry-after", "x-llmopt-cache", REPLICA_HEADER.lower()}
FAILED = (RayError, RayServeException)  # a replica died, or Ray could not reach one

app = FastAPI(title="llmopt cluster", docs_url=None, redoc_url=None)


add_error_handlers(app)


def _unavailable(what: str) -> APIError:
    return APIError(
        503,
        f"no engine replica could take the request ({what}); retry shortly",
        type="server_error",
        code="no_healthy_replica",
        headers={"Retry-After": "2"},
    )


async def _relay(answer: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    """The replica's event stream, piece by piece; an error event if it fails midway."""
    try:
        async for piece in answer:
            yield piece
    except FAILED as e:
        error = APIError(
            502,
            f"the engine replica failed mid-answer ({type(e).__name__}); the answer is incomplete",
            type="server_error",
            code="replica_failed",
        )
        yield sse(error.body()).encode()
        yield sse("[DONE]").encode()
    finally:
        answer.cancel()  # no-op once it is complete; else the replica stops generating


@serve.ingress(app)
class Ingress:
    def __init__(self, engines: DeploymentHandle, models: list[str], api_key: str | None) -> None:
        self.engines = engines.options(stream=True)
        self.models = models  # the names the replicas serve (checked before routing)
        self.api_key = api_key  # the replicas check it too; here, before anything else

    def _check_key(self, request: Request) -> None:
        if not authorized(request.headers.get("authorization", ""), self.api_key):
            raise unauthorized()

    async def _forward(self, request: Request, view: RequestView, body: bytes) -> Response:
        headers = {k: v for k, v in request.headers.items() if k in ("authorization",)}
        headers["content-type"] = "application/json"
        answer = self.engines.forward.remote(view, request.method, request.url.path, body, headers)
        try:
            head: Head = await answer.__anext__()
        except FAILED as e:
            answer.cancel()
            raise _unavailable(type(e).__name__) from None
        status, pairs = head
        passed = {k: v for k, v in pairs if k.lower() in PASSED_HEADERS}
        if passed.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay(answer), status_code=status, headers=passed)
        try:
            content = b"".join([piece async for piece in answer])
        except FAILED as e:
            raise _unavailable(type(e).__name__) from None
        return Response(content, status_code=status, headers=passed)

    async def _complete(self, request: Request) -> Response:
        self._check_key(request)
        body = await request.body()
        view = read_request(request.url.path, body)
        if view.model is not None and view.model not in self.models:
            raise APIError(
                404,
                f"model '{view.model}' is not served here; models: {', '.join(self.models)}",
                param="model",
                code="model_not_found",
            )
        return await self._forward(request, view, body)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._complete(request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> Response:
        self._check_key(request)
        return await self._forward(request, ANY_REQUEST, b"")

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        self._check_key(request)
        text = b"".join(m.render() for m in routers_metrics())
        return Response(text, media_type=CONTENT_TYPE_LATEST)
