"""`llmopt serve` refusing what it must: bad input (4xx in the OpenAI error shape), a
wrong API key, a full queue, a request past its timeout; and the command itself:
SIGTERM drains in-flight requests, bad options are usage errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llmopt.config import ServerConfig
from tests.conftest import REAL_HOME
from tests.server_helpers import MODEL, ask, client, load, start, wait_idle

pytestmark = pytest.mark.real_model


# -- bad input -------------------------------------------------------------------------------


def _chat(**over) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **over}


BAD = [
    ("malformed json", b'{"model": "x", "messages": [', 400),
    ("wrong type", _chat(max_tokens="many"), 400),
    ("negative max_tokens", _chat(max_tokens=-5), 400),
    ("huge max_tokens", _chat(max_tokens=10**9), 400),
    ("empty messages", _chat(messages=[]), 400),
    ("invalid role", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400),
    ("no messages", {"model": MODEL}, 400),
    ("temperature out of range", _chat(temperature=7), 400),
    ("n zero", _chat(n=0), 400),
    ("too many stops", _chat(stop=["a", "b", "c", "d", "e"]), 400),
    (
        "image content",
        _chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        400,
    ),
    ("tools", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400),
    ("logit_bias", _chat(logit_bias={"1": 5}), 400),
    ("unknown model", _chat(model="gpt-9"), 404),
    ("oversized prompt", _chat(messages=[{"role": "user", "content": "word " * 3000}]), 400),
]


@pytest.mark.parametrize(("what", "body", "status"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_in_openai_shape(live, what, body, status) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(
        live.url + "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and set(err) == {"message", "type", "param", "code"}
    if what in ("huge max_tokens", "oversized prompt"):
        assert "2048" in err["message"] and err["code"] == "context_length_exceeded"
    assert httpx.get(live.url + "/health").status_code == 200


def test_bad_completion_inputs(live) -> None:
    for body in (
        {"model": MODEL, "prompt": [10**9]},
        {"model": MODEL, "prompt": []},
        {"model": MODEL, "prompt": "x", "suffix": "y"},
    ):
        r = httpx.post(live.url + "/v1/completions", json=body)
        assert r.status_code == 400, r.text
    assert httpx.get(live.url + "/v1/nothing").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(live).completions.create(model="other", prompt="x")


# -- protection ------------------------------------------------------------------------------


def test_api_key_required_everywhere_but_health(smollm_fp32) -> None:
    with start(smollm_fp32, ServerConfig(api_key="s3cret")) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        assert ask(client(s, api_key="s3cret"), "Hi", max_tokens=2).choices


def test_full_queue_answers_429_with_retry_after(smollm_fp32) -> None:
    config = ServerConfig(max_queue=1)
    with start(smollm_fp32, config, max_num_seqs=1) as s:
        long = {
            "model": MODEL,
            "prompt": "Story:",
            "max_tokens": 1000,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", s.url + "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # generating: it holds the one batch slot
            with httpx.stream("POST", s.url + "/v1/completions", json=long):
                deadline = time.monotonic() + 10
                while load(s).waiting < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                r = httpx.post(s.url + "/v1/completions", json={**long, "stream": False})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
        wait_idle(s)


def test_request_timeout_ends_request_and_frees_blocks(smollm_fp32) -> None:
    config = ServerConfig(request_timeout_s=0.5)
    with start(smollm_fp32, config) as s:
        body = {"model": MODEL, "prompt": "Story:", "max_tokens": 1500, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "error" in json.loads(events[-2][6:]) and events[-1] == "data: [DONE]"
        wait_idle(s)


# -- the command -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_requests(smollm_gguf) -> None:
    port = _free_port()
    env = {**os.environ, "LLMOPT_HOME": str(REAL_HOME)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmopt",
            "serve",
            str(smollm_gguf),
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--kv-cache-memory",
            "0.1",
            "--log-level",
            "warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        body = {"prompt": "Story:", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert rest[-1]["choices"][0]["finish_reason"] == "length"  # it ran to the end
        # uvicorn re-raises the signal once drained: the conventional "ended by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Traceback" not in proc.stderr.read()
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        proc.kill()


def test_serve_refuses_bad_options() -> None:
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    def serve(*args: str):
        return CliRunner().invoke(app, ["serve", *args])

    port = _free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = serve("--port", str(port))
        assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.stderr
    r = serve("--port", "70000")
    assert r.exit_code == 2 and "not a TCP port" in r.stderr
    r = serve("--max-queue", "-1")
    assert r.exit_code == 2 and "--max-queue" in r.stderr
    r = serve("--semantic-cache", "--embedding-model", "/nonexistent")
    assert r.exit_code == 2 and "embedding model" in r.stderr
