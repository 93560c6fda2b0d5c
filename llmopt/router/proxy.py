"""Forwarding one request: choose a replica with the policy, send, and pass the answer
through; on a failure before the client has seen a byte, try another replica.

A streamed answer is relayed event by event as the replica sends it. If the replica
fails mid-stream the client's stream ends with an error event in the OpenAI shape and
`data: [DONE]`: its first tokens are already out, so it cannot be retried.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from fastapi import Response
from fastapi.responses import StreamingResponse

from llmopt.openai_wire import APIError, sse
from llmopt.router.config import RouterConfig
from llmopt.router.metrics import RouterMetrics
from llmopt.router.policies import Policy
from llmopt.router.replicas import Fleet, Replica
from llmopt.router.request_view import RequestView, route_for
from llmopt.router.state import RouteRequest

RETRYABLE = {429, 500, 502, 503, 504}  # another replica may well succeed
PASSED_HEADERS = ("content-type", "retry-after", "x-llmopt-cache")


class Router:
    def __init__(
        self,
        config: RouterConfig,
        fleet: Fleet,
        policy: Policy,
        metrics: RouterMetrics,
    ) -> None:
        self.config, self.fleet, self.policy, self.metrics = config, fleet, policy, metrics

    def check_model(self, model: str | None) -> None:
        """404 for a model no replica serves, with the list of those served. A model
        whose replicas are all down is known: that is a 503, not a 404."""
        known = [c["id"] for c in self.fleet.models(healthy_only=False)]
        if model is not None and known and model not in known:
            raise APIError(
                404,
                f"model '{model}' is not served here; models: {', '.join(sorted(known))}",
                param="model",
                code="model_not_found",
            )

    def _unavailable(self, model: str | None) -> APIError:
        what = f" for model '{model}'" if model else ""
        return APIError(
            503,
            f"no healthy replica{what} can take the request; retry shortly",
            type="server_error",
            code="no_healthy_replica",
            headers={"Retry-After": str(max(1, round(self.config.health_interval_s)))},
        )

    async def forward(
        self, path: str, raw: bytes, view: RequestView, authorization: str | None
    ) -> Response:
        self.check_model(view.model)
        route, keys = route_for(view, self.fleet.index)
        headers = {"Content-Type": "application/json", **self.fleet.headers}
        if authorization and not self.fleet.headers:
            headers["Authorization"] = authorization
        tried: set[str] = set()
        for _ in range(self.config.max_attempts):
            candidates = self.fleet.candidates(view.model, tried)
            if not candidates:
                break
            state = self.policy.choose(route, candidates)
            if tried:
                self.metrics.count(self.metrics.retries, state.name)
            tried.add(state.name)
            replica = self.fleet.by_name(state.name)
            response = await self._try(replica, route, keys, path, raw, headers)
            if response is not None:
                return response
        raise self._unavailable(view.model)

    async def _try(
        self,
        replica: Replica,
        route: RouteRequest,
        keys: list[int],
        path: str,
        raw: bytes,
        headers: dict[str, str],
    ) -> Response | None:
        """The replica's answer, or None (counted as an error) if it failed before any
        of it reached the client."""
        state, m = replica.state, self.metrics
        hit = route.prefix.depth(state.name) > 0
        m.started(state.name, cold=state.start(route), prefix_hit=hit)
        self.fleet.index.insert(keys, state.name)
        client = self.fleet.client
        request = client.build_request("POST", replica.url + path, content=raw, headers=headers)
        try:
            upstream = await client.send(request, stream=True)
        except httpx.HTTPError:
            state.finish(route)
            m.count(m.errors, state.name)
            self.fleet.mark_down(replica)
            return None
        if upstream.status_code in RETRYABLE:
            await upstream.aclose()
            state.finish(route)
            m.count(m.errors, state.name)
            return None
        passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            body = self._relay(replica, route, upstream)
            return StreamingResponse(body, status_code=upstream.status_code, headers=passed)
        try:
            content = await upstream.aread()
        except httpx.HTTPError:
            m.count(m.errors, state.name)
            self.fleet.mark_down(replica)
            return None
        finally:
            await upstream.aclose()
            state.finish(route)
        return Response(content, status_code=upstream.status_code, headers=passed)

    async def _relay(
        self, replica: Replica, route: RouteRequest, upstream: httpx.Response
    ) -> AsyncIterator[str]:
        """The replica's events, each forwarded whole as soon as its blank line arrives
        (a half event is never sent, so an error event after it stays well formed)."""
        event: list[str] = []
        done = False
        try:
            async for line in upstream.aiter_lines():
                if line:
                    event.append(line)
                    continue
                if event:
                    done = event == ["data: [DONE]"]
                    yield "\n".join(event) + "\n\n"
                    event = []
            if not done:
                raise httpx.RemoteProtocolError("the stream ended without data: [DONE]")
        except httpx.HTTPError:
            self.metrics.count(self.metrics.errors, replica.state.name)
            self.fleet.mark_down(replica)
            error = APIError(
                502,
                f"the replica {replica.url} failed mid-answer; the answer is incomplete",
                type="server_error",
                code="replica_failed",
            )
            yield sse(error.body())
            yield sse("[DONE]")
        finally:
            await upstream.aclose()
            replica.state.finish(route)
