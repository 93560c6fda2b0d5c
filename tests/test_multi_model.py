"""Several models in one server, within a memory budget: tiny random models (about
25 MB of fp32 weights and 10 MB of KV cache each), in engines on threads of the test
process for speed, and once through `llmopt serve --model A --model B`, whose engines
run in processes of their own."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from llmopt.config import ServerConfig
from llmopt.engine.async_engine import AsyncEngine
from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import open_engine
from llmopt.router.config import RouterConfig
from llmopt.router.replicas import Fleet
from llmopt.server.app import create_app
from llmopt.server.model_manager import ModelManager, ServedModel
from llmopt.server.service import Server
from tests.conftest import REAL_HOME, write_tiny_model
from tests.live_server import LiveServer
from tests.server_helpers import metrics

ENGINE = EngineConfig(dtype="float32", kv_cache_memory=0.01, max_num_seqs=8)
ONE_FITS = 0.06e9  # bytes: one tiny model (35-39 MB) fits, two do not; the big one never


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm_folder) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    models = {
        "tiny-a": write_tiny_model(root / "tiny-a", smollm_folder),
        "tiny-b": write_tiny_model(root / "tiny-b", smollm_folder),
        "tiny-big": write_tiny_model(root / "tiny-big", smollm_folder, hidden_size=256),
    }
    # The native kernels are built once per process, in the first home asked: the
    # user's, where they are kept between runs, not a test's empty one (about 15 s).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPT_HOME", str(REAL_HOME))
        open_engine(ENGINE.replace(model=str(models["tiny-a"])))
    return models


def serve(tiny: dict[str, Path], budget: float | None, keep_alive: float | None) -> LiveServer:
    models = [ServedModel(name, ENGINE.replace(model=str(p))) for name, p in tiny.items()]
    manager = ModelManager(
        models,
        None if budget is None else int(budget),
        keep_alive,
        spawn=lambda config: AsyncEngine(open_engine(config).engine),
    )
    live = LiveServer(create_app(Server(manager, ServerConfig())))
    live.manager = manager  # type: ignore[attr-defined]
    return live


def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)


def ask(live: LiveServer, model: str, **kw) -> openai.types.Completion:
    return client(live).completions.create(
        model=model, prompt="Once upon a time", max_tokens=4, temperature=0, **kw
    )


def loaded(live: LiveServer) -> set[str]:
    status = httpx.get(live.url + "/v1/status").json()
    return {m["id"] for m in status["models"] if m["loaded"]}


def status_of(live: LiveServer, model: str) -> dict:
    models = httpx.get(live.url + "/v1/status").json()["models"]
    return next(m for m in models if m["id"] == model)


def test_two_models_answer_and_are_reported(tiny) -> None:
    with serve(tiny, budget=1e9, keep_alive=None) as s:
        cards = {m.id: m for m in client(s).models.list()}
        assert set(cards) == set(tiny) and not any(m.loaded for m in cards.values())
        chat = client(s).chat.completions.create(
            model="tiny-a", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.model == "tiny-a" and chat.usage.completion_tokens == 4
        chunks = list(ask(s, "tiny-b", stream=True))
        assert {c.model for c in chunks} == {"tiny-b"}
        assert chunks[-1].choices[0].finish_reason == "length"

        status = httpx.get(s.url + "/v1/status").json()
        assert loaded(s) == {"tiny-a", "tiny-b"}
        a = status_of(s, "tiny-a")
        assert a["running"] == a["waiting"] == a["in_flight"] == 0 and a["loads"] == 1
        assert a["kv_cache_tokens_total"] > 0 and a["prefix_cache_miss_tokens"] > 0
        held = sum(m["bytes"] for m in status["models"] if m["loaded"])
        assert status["memory_held_bytes"] == held > 0
        assert status["max_loaded_models"] == 3  # all three fit in 1 GB
        assert {m.id: m.loaded for m in client(s).models.list()}["tiny-a"]

        # The router's model-aware policy learns what each replica holds from /v1/status.
        async def router_view():
            async with httpx.AsyncClient() as http:
                fleet = Fleet(RouterConfig((s.url,)), http)
                await fleet.check(fleet.replicas[0])
                return fleet.replicas[0].state

        state = asyncio.run(router_view())
        assert state.healthy and state.models == frozenset(tiny)
        assert sorted(state.loaded) == ["tiny-a", "tiny-b"] and state.max_loaded == 3


def test_loading_a_model_unloads_the_least_recently_used(tiny) -> None:
    with serve(tiny, budget=ONE_FITS, keep_alive=None) as s:
        # Three requests at once for a model not loaded: they all wait for one load.
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: ask(s, "tiny-a"), range(3)))
        assert all(a.choices[0].text for a in answers)
        assert loaded(s) == {"tiny-a"}
        ask(s, "tiny-b")
        assert loaded(s) == {"tiny-b"}
        ask(s, "tiny-a")
        assert loaded(s) == {"tiny-a"}
        m = metrics(s.url)
        assert m['llmopt_model_loads_total{model="tiny-a"}'] == 2
        assert m['llmopt_model_loads_total{model="tiny-b"}'] == 1
        assert m['llmopt_model_unloads_total{model="tiny-a",reason="room"}'] == 1
        assert m['llmopt_model_unloads_total{model="tiny-b",reason="room"}'] == 1
        assert m['llmopt_model_load_seconds_count{model="tiny-a"}'] == 2
        assert m["llmopt_models_loaded"] == 1
        assert m["llmopt_memory_held_bytes"] == m['llmopt_model_bytes{model="tiny-a"}'] > 0
        assert m["llmopt_memory_held_bytes"] <= m["llmopt_memory_budget_bytes"] == ONE_FITS


def test_keep_alive_zero_unloads_once_idle(tiny) -> None:
    with serve(tiny, budget=None, keep_alive=0) as s:
        ask(s, "tiny-a")
        deadline = time.monotonic() + 10
        while loaded(s):
            assert time.monotonic() < deadline, "tiny-a stayed loaded"
            time.sleep(0.05)
        assert metrics(s.url)['llmopt_model_unloads_total{model="tiny-a",reason="idle"}'] == 1
        ask(s, "tiny-a")  # loads again
        assert status_of(s, "tiny-a")["loads"] == 2


def test_unknown_model_and_one_too_large_for_the_budget(tiny) -> None:
    with serve(tiny, budget=ONE_FITS, keep_alive=None) as s:
        with pytest.raises(openai.NotFoundError) as e:
            ask(s, "nope")
        assert "'tiny-a', 'tiny-b', 'tiny-big'" in e.value.message
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "Hi"})  # no model named
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny-big", "prompt": "Hi"})
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        error = r.json()["error"]
        assert error["code"] == "model_too_large" and "memory budget" in error["message"]
        assert status_of(s, "tiny-big")["loads"] == 0 and not loaded(s)


def test_a_model_in_flight_is_never_unloaded(tiny) -> None:
    with serve(tiny, budget=ONE_FITS, keep_alive=None) as s:
        # An answer far bigger than the socket buffers: unread, it holds its lease.
        body = {
            "model": "tiny-a",
            "prompt": "Story:",
            "max_tokens": 400,
            "n": 4,
            "logprobs": 5,
            "ignore_eos": True,
            "stream": True,
        }
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            assert status_of(s, "tiny-a")["in_flight"] == 1
            busy = httpx.post(s.url + "/v1/completions", json={"model": "tiny-b", "prompt": "x"})
            assert busy.status_code == 503 and busy.headers["retry-after"]
            assert busy.json()["error"]["code"] == "model_not_loaded"
            assert loaded(s) == {"tiny-a"}
            done = [x for x in lines if '"finish_reason":"length"' in x.replace(" ", "")]
        assert len(done) == 4  # every choice ran to its end
        ask(s, "tiny-b")  # now tiny-a is idle and makes room
        assert loaded(s) == {"tiny-b"}


# -- the command -----------------------------------------------------------------------------


def _serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmopt", "serve", *args]


def test_serve_command_with_two_models(tiny) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--model", str(tiny["tiny-a"]), "--model", str(tiny["tiny-b"])]
    args += ["--memory-budget", str(ONE_FITS / 1e9), "--kv-cache-memory", "0.01"]
    args += ["--dtype", "float32", "--port", str(port), "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LLMOPT_HOME": str(REAL_HOME)}
    proc = subprocess.Popen(_serve_cmd(*args), env=env, stderr=subprocess.PIPE, text=True)
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
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        for model in ("tiny-a", "tiny-b"):
            answer = c.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
            )
            assert answer.model == model and answer.choices[0].message.content
        status = httpx.get(url + "/v1/status").json()
        assert [m["id"] for m in status["models"] if m["loaded"]] == ["tiny-b"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        err = proc.stderr.read()
        assert "serving tiny-a, tiny-b at" in err and "memory budget 0.06 GB" in err
        assert "loaded tiny-a" in err and "unloaded tiny-a (to make room" in err
        assert "Traceback" not in err
    finally:
        proc.kill()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--served-model-name", "x"], "--served-model-name names a lone model"),
        (["--keep-alive", "-5"], "--keep-alive must be"),
        (["--memory-budget", "0"], "--memory-budget must be"),
    ],
)
def test_serve_refuses_bad_multi_model_options(tiny, extra, message) -> None:
    from typer.testing import CliRunner

    from llmopt.cli.main import app

    args = ["serve", "--model", str(tiny["tiny-a"]), "--model", str(tiny["tiny-b"]), *extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.stderr
