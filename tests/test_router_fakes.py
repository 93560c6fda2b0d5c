"""The router over fake replicas (small OpenAI-shaped apps in this process): cold starts
counted under model-aware and round-robin, health checks taking a replica out and back,
and the router's own errors (400, 401, 404, 503)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from llmopt.router.app import create_app
from llmopt.router.config import RouterConfig
from tests.live_server import LiveServer
from tests.server_helpers import metrics


def fake_replica(models: list[str], loaded: list[str]) -> FastAPI:
    """Serves `models`, holds one at a time (max_loaded_models 1), loads on demand."""
    app = FastAPI()
    app.state.healthy = True

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if app.state.healthy else 503)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}

    @app.get("/v1/status")
    async def status():
        cards = [{"id": m, "loaded": m in loaded} for m in models]
        return {"object": "status", "models": cards, "max_loaded_models": 1}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        loaded[:] = [body["model"]]
        if body.get("stream"):  # slow to answer: a client may leave before the first byte
            await asyncio.sleep(0.3)
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}}]}
            events = [f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]
            return StreamingResponse(iter(events), media_type="text/event-stream")
        message = {"role": "assistant", "content": "ok"}
        return {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}

    return app


@pytest.fixture
def fakes():
    apps = [fake_replica(["a", "b"], ["a"]), fake_replica(["a", "b"], ["b"])]
    servers = [LiveServer(app) for app in apps]
    yield apps, [s.url for s in servers]
    for s in servers:
        s.close()


def router(urls: list[str], **kw) -> LiveServer:
    return LiveServer(create_app(RouterConfig(tuple(urls), health_interval_s=0.1, **kw)))


def chat(url: str, model: str, **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=10, **kw)


def healthy_replicas(url: str) -> int:
    return httpx.get(url + "/health").json()["healthy_replicas"]


def wait_until(check, timeout: float = 10.0) -> None:
    """Until `check()` holds: health checks run every 0.1 s, on a machine maybe busy."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the router never saw the change"
        time.sleep(0.05)


def total(series: dict[str, float], name: str) -> float:
    return sum(v for k, v in series.items() if k.startswith(name + "{"))


@pytest.mark.parametrize("policy", ["model-aware", "round-robin"])
def test_cold_starts_are_counted(fakes, policy: str) -> None:
    _, urls = fakes
    with router(urls, policy=policy) as r:
        for model in "aabbaabb":
            assert chat(r.url, model).status_code == 200
        cold = total(metrics(r.url), "llmopt_router_cold_starts_total")
    # model-aware keeps a on the replica holding a, b on the other: never a load
    assert cold == 0 if policy == "model-aware" else cold >= 4


def test_unhealthy_replicas_leave_the_rotation_and_come_back(fakes) -> None:
    apps, urls = fakes
    with router(urls, policy="round-robin") as r:
        apps[0].state.healthy = False
        wait_until(lambda: healthy_replicas(r.url) == 1)
        for _ in range(4):
            assert chat(r.url, "a").status_code == 200
        served = metrics(r.url)
        assert (
            served[f'llmopt_router_replica_healthy{{policy="round-robin",replica="{urls[0]}"}}']
            == 0
        )
        apps[1].state.healthy = False
        wait_until(lambda: healthy_replicas(r.url) == 0)
        down = chat(r.url, "a")
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert down.json()["error"]["code"] == "no_healthy_replica"
        assert httpx.get(r.url + "/health").status_code == 503
        apps[0].state.healthy = apps[1].state.healthy = True
        wait_until(lambda: healthy_replicas(r.url) == 2)
        assert chat(r.url, "b").status_code == 200


def test_a_client_gone_before_the_first_byte_frees_its_replica(fakes) -> None:
    """A streamed request whose client disconnects while the replica is still preparing
    its answer: the router's in-flight count for that replica comes back to 0 (the
    relayed body never starts, so its own cleanup never runs)."""
    _, urls = fakes
    with router(urls, policy="least-connections") as r:
        host, port = r.url.removeprefix("http://").split(":")
        body = json.dumps(
            {"model": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        )
        for _ in range(3):
            with socket.create_connection((host, int(port))) as conn:
                conn.sendall(
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                    f"{body}".encode()
                )  # and gone at once
        time.sleep(1.0)  # the replicas answer after 0.3 s

        def in_flight() -> float:
            return total(metrics(r.url), "llmopt_router_in_flight")

        wait_until(lambda: in_flight() == 0, timeout=5)
        assert chat(r.url, "a").status_code == 200


def test_router_errors_in_the_openai_shape(fakes) -> None:
    _, urls = fakes
    with router(urls, api_key="secret") as r:
        denied = chat(r.url, "a")
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer secret"}
        assert chat(r.url, "a", headers=auth).status_code == 200
        unknown = chat(r.url, "c", headers=auth)
        assert unknown.status_code == 404 and "models: a, b" in unknown.json()["error"]["message"]
        bad = httpx.post(r.url + "/v1/completions", content=b"{nope", headers=auth)
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        models = httpx.get(r.url + "/v1/models", headers=auth).json()["data"]
        assert [m["id"] for m in models] == ["a", "b"]


def test_router_command_refuses_bad_options(tmp_path) -> None:
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    def run(*args: str):
        return CliRunner().invoke(app, ["router", *args])

    r = run()
    assert r.exit_code == 2 and "--replica URL" in r.stderr
    r = run("--replica", "http://127.0.0.1:1", "--policy", "random")
    assert r.exit_code == 2 and "round-robin, least-connections, model-aware" in r.stderr
    r = run("--replica", "localhost:8000")
    assert r.exit_code == 2 and "not an http://" in r.stderr
    r = run("--spawn", "2")
    assert r.exit_code == 2 and "needs N >= 1 and a MODEL" in r.stderr
    r = run("--replicas-file", str(tmp_path / "missing.txt"))
    assert r.exit_code == 2 and "cannot read --replicas-file" in r.stderr
