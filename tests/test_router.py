"""The router under the openai client over two real `llmopt serve` replicas of SmolLM2
(started as `llmopt router --spawn` starts them): chat and completions, streamed and
not, the models and metrics, and failover when a replica is killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llmopt.router.app import create_app
from llmopt.router.config import RouterConfig
from llmopt.router.spawn import LocalReplicas
from tests.conftest import REAL_HOME
from tests.live_server import LiveServer
from tests.server_helpers import client, metrics

SERVE_ARGS = ["--kv-cache-memory", "0.05", "--no-response-cache"]


@pytest.fixture(scope="module")
def replicas(smollm_gguf):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPT_HOME", str(REAL_HOME))  # the converted model is there
        mp.setenv("OMP_NUM_THREADS", "1")
        local = LocalReplicas(str(smollm_gguf), 2, 2, SERVE_ARGS)
    try:
        local.wait_ready(timeout_s=120)
        yield local
    finally:
        local.stop(timeout_s=10)


def router(local: LocalReplicas, policy: str = "least-connections") -> LiveServer:
    config = RouterConfig(tuple(local.urls), policy=policy, health_interval_s=0.2)
    return LiveServer(create_app(config))


def test_chat_and_completions_through_the_router(replicas) -> None:
    with router(replicas) as r:
        c = client(r)
        model = c.models.list().data[0].id
        assert [m.id for m in c.models.list().data] == [model]  # the union: one model
        chat = c.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8
        )
        assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
        done = c.completions.create(model=model, prompt="Once upon a time", max_tokens=8)
        assert done.choices[0].text
        # Streamed: the chunks arrive one by one, the first well before the last.
        start, arrivals, text = time.monotonic(), [], []
        stream = c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell a story."}],
            max_tokens=24,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            arrivals.append(time.monotonic() - start)
            text.append(chunk.choices[0].delta.content or "")
        assert len(arrivals) >= 20 and "".join(text)
        assert arrivals[0] < 0.7 * arrivals[-1]
        parts = list(c.completions.create(model=model, prompt="A", max_tokens=6, stream=True))
        assert parts[-1].choices[0].finish_reason == "length"
        series = metrics(r.url)
        sent = sum(v for k, v in series.items() if k.startswith("llmopt_router_requests_total"))
        assert sent == 4
        assert all(v == 0 for k, v in series.items() if k.startswith("llmopt_router_in_flight"))
        # What the model-aware policy reads from a replica.
        status = httpx.get(replicas.urls[0] + "/v1/status").json()
        assert status["max_loaded_models"] is None
        assert status["models"][0]["id"] == model and status["models"][0]["loaded"] is True
        assert {"running", "waiting", "kv_cache_tokens_used"} <= set(status["models"][0])


def test_a_killed_replica_loses_no_request(replicas) -> None:
    """Last in this module: it kills one of the replicas."""
    with router(replicas, policy="round-robin") as r:
        c = client(r, timeout=60)
        model = c.models.list().data[0].id

        def complete(i: int) -> str:
            out = c.completions.create(
                model=model,
                prompt=f"Count to {i}:",
                max_tokens=100,
                extra_body={"ignore_eos": True},
            )
            return out.choices[0].finish_reason

        def stream() -> list[str]:
            body = {"model": model, "prompt": "Story:", "max_tokens": 300, "ignore_eos": True}
            body["stream"] = True
            with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=60) as s:
                return [line for line in s.iter_lines() if line]

        with ThreadPoolExecutor(8) as pool:
            # Round-robin: one long stream on each replica, then the rest.
            streams = []
            for _ in range(2):
                streams.append(pool.submit(stream))
                time.sleep(0.3)
            plain = [pool.submit(complete, i) for i in range(6)]
            time.sleep(1.0)  # every request is under way on one replica or the other
            os.kill(replicas.procs[0].pid, signal.SIGKILL)
            assert [f.result(timeout=90) for f in plain] == ["length"] * 6
            ends = []
            for f in streams:
                events = f.result(timeout=90)
                assert events[-1] == "data: [DONE]"
                last = json.loads(events[-2].removeprefix("data: "))
                ends.append(last["error"]["code"] if "error" in last else "length")
                assert len(events) > 3  # some tokens came before the end, whichever it was
        # The stream on the killed replica ends with an error event, the other completes.
        assert sorted(ends) == ["length", "replica_failed"]
        series = metrics(r.url)
        dead = f'{{policy="round-robin",replica="{replicas.urls[0]}"}}'
        assert series["llmopt_router_replica_healthy" + dead] == 0
        assert series["llmopt_router_errors_total" + dead] >= 1
        retried = [v for k, v in series.items() if k.startswith("llmopt_router_retries_total")]
        assert sum(retried) >= 1  # a plain request on the killed replica went to the other
        assert complete(0) == "length"  # the survivor takes everything now
