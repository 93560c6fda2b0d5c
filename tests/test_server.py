"""`llmopt serve` driven by the official openai client (sync and async) and raw HTTP:
real SmolLM2 in fp32, a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from llmopt.config import ServerConfig
from llmopt.engine.async_engine import AsyncEngine
from llmopt.engine.llm import build_engine
from llmopt.engine.scheduler import SchedulerConfig
from llmopt.server.app import Server, create_app
from tests.conftest import REAL_HOME
from tests.live_server import LiveServer

pytestmark = pytest.mark.real_model
MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    f"In one sentence, what is {topic}?"
    for topic in (
        "rain",
        "a prime number",
        "Paris",
        "gravity",
        "a violin",
        "the moon",
        "bread",
        "a river",
        "chess",
        "a volcano",
        "coffee",
        "a comet",
        "silk",
        "a glacier",
        "jazz",
        "a lighthouse",
    )
]


def start(loaded, config: ServerConfig | None = None, embedder=None, **engine_kw) -> LiveServer:
    sched = SchedulerConfig(engine_kw.pop("max_num_seqs", 64), 512)
    engine = build_engine(loaded, 2048, kv_cache_memory=0.1, scheduler_config=sched, **engine_kw)
    server = Server(AsyncEngine(engine), config or ServerConfig(model_name=MODEL), embedder)
    live = LiveServer(create_app(server))
    live.app_server = server  # type: ignore[attr-defined]
    return live


@pytest.fixture(scope="module")
def live(smollm_fp32) -> Iterator[LiveServer]:
    with start(smollm_fp32) as s:
        yield s


def client(live: LiveServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
    )


def load(live: LiveServer):
    return live.app_server.engine.load()  # type: ignore[attr-defined]


def wait_idle(live: LiveServer, timeout: float = 10) -> None:
    """Until no KV block is referenced (an abort is applied before the engine's next step)."""
    deadline = time.monotonic() + timeout
    while load(live).kv_blocks_used or load(live).running:
        assert time.monotonic() < deadline, f"blocks still in use: {load(live)}"
        time.sleep(0.05)


def ask(c: openai.OpenAI, q: str, **kw):
    return c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, **kw
    )


# -- the API through the openai client --------------------------------------------------


def test_chat_streamed_and_not_agree_and_report_usage(live) -> None:
    c = client(live)
    whole = ask(c, QUESTIONS[0], max_tokens=24, extra_body={"cache": False})
    assert whole.object == "chat.completion" and whole.model == MODEL
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = ask(
        c,
        QUESTIONS[0],
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"cache": False},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        whole.usage.completion_tokens
    )
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == choice.finish_reason and set(finishes[:-1]) == {None}


def test_completions_stop_n_seed_echo(live) -> None:
    c = client(live)
    out = c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0, echo=True
    )
    assert out.object == "text_completion"
    assert out.choices[0].text.startswith("The capital of France is")
    # stop: the text ends before the stop string, which never appears
    full = (
        c.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0)
        .choices[0]
        .text
    )
    assert " 5" in full
    cut = c.completions.create(
        model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[" 5"]
    ).choices[0]
    assert cut.text == full[: full.index(" 5")] and cut.finish_reason == "stop"
    # n with a seed: n reproducible samples; the same seed gives the same n again
    kw = dict(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=1.0,
        n=3,
        seed=7,
        extra_body={"cache": False},
    )
    a = [ch.text for ch in sorted(c.completions.create(**kw).choices, key=lambda x: x.index)]
    b = [ch.text for ch in sorted(c.completions.create(**kw).choices, key=lambda x: x.index)]
    assert a == b and len(set(a)) > 1
    # a batch of prompts, and token ids as a prompt
    ids = live.app_server.tokenizer.encode("Hello")  # type: ignore[attr-defined]
    two = c.completions.create(
        model=MODEL, prompt=["Hello", "Bonjour"], max_tokens=4, temperature=0
    )
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert len(two.choices) == 2 and by_ids.choices[0].text == two.choices[0].text


def test_logprobs_match_the_reference_model(live, smollm_folder) -> None:
    """The first token's logprob equals transformers' log-softmax on the same prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    c = client(live)
    out = ask(c, QUESTIONS[2], max_tokens=3, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    first = content[0]
    assert [t.logprob for t in first.top_logprobs] == sorted(
        (t.logprob for t in first.top_logprobs), reverse=True
    )
    assert first.token == first.top_logprobs[0].token  # greedy takes the top one

    tok = live.app_server.tokenizer  # type: ignore[attr-defined]
    ids = tok.encode_chat([{"role": "user", "content": QUESTIONS[2]}])
    ref = AutoModelForCausalLM.from_pretrained(smollm_folder, torch_dtype=torch.float32)
    with torch.no_grad():
        lp = ref(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    top = lp.topk(3)
    assert [tok.decode([int(i)]) for i in top.indices] == [t.token for t in first.top_logprobs]
    assert first.logprob == pytest.approx(float(top.values[0]), abs=1e-3)

    legacy = c.completions.create(
        model=MODEL, prompt="2 + 2 =", max_tokens=2, temperature=0, logprobs=2
    )
    lps = legacy.choices[0].logprobs
    assert len(lps.tokens) == len(lps.token_logprobs) == len(lps.top_logprobs) == 2
    assert lps.text_offset[0] == 0


def test_models_and_health(live) -> None:
    assert [m.id for m in client(live).models.list()] == [MODEL]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


# -- concurrency and cancellation ---------------------------------------------------------


def test_32_parallel_streams_equal_serial_runs(live) -> None:
    questions = (QUESTIONS * 2)[:32]
    serial = [
        ask(client(live), q, max_tokens=16, extra_body={"cache": False}).choices[0].message.content
        for q in questions
    ]

    async def one(c: openai.AsyncOpenAI, q: str) -> str:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": q}],
            temperature=0,
            max_tokens=16,
            stream=True,
            extra_body={"cache": False},
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in stream])

    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*(one(c, q) for q in questions))

    assert asyncio.run(main()) == serial
    wait_idle(live)


def test_client_disconnect_cancels_and_frees_blocks(live) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0,
    }
    with httpx.stream(
        "POST", live.url + "/v1/chat/completions", json={**body, "stream": True}
    ) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert load(live).kv_blocks_used > 0
    wait_idle(live)  # well before 1500 tokens could have been generated
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=1.0)
    wait_idle(live)
    assert ask(client(live), "Hi", max_tokens=2).choices[0].message.content  # still serving


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
    with start(smollm_fp32, ServerConfig(model_name=MODEL, api_key="s3cret")) as s:
        assert httpx.get(s.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/metrics").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        assert ask(client(s, api_key="s3cret"), "Hi", max_tokens=2).choices


def test_full_queue_answers_429_with_retry_after(smollm_fp32) -> None:
    config = ServerConfig(model_name=MODEL, max_queue=1)
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
    config = ServerConfig(model_name=MODEL, request_timeout_s=0.5)
    with start(smollm_fp32, config) as s:
        body = {"model": MODEL, "prompt": "Story:", "max_tokens": 1500, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/completions", json=body)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert "error" in json.loads(events[-2][6:]) and events[-1] == "data: [DONE]"
        wait_idle(s)


# -- response caches ----------------------------------------------------------------------


def _generated_tokens(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("llmopt_generation_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no generation token counter")


def test_exact_cache_hit_skips_the_engine(live) -> None:
    c = client(live)
    q = "Name one color of the rainbow."
    first = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12
    )
    assert first.headers["x-llmopt-cache"] == "miss"
    before = _generated_tokens(live.url)
    again = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=12
    )
    assert again.headers["x-llmopt-cache"] == "hit-exact"
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    # streamed like a live answer
    stream = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": q}],
        temperature=0,
        max_tokens=12,
        stream=True,
    )
    chunks = list(stream)
    assert len(chunks) > 3
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == (
        first.parse().choices[0].message.content
    )
    assert _generated_tokens(live.url) == before  # the engine was never asked
    # opt-out, other settings and sampled requests are not served from the cache
    for kw in ({"extra_body": {"cache": False}}, {"max_tokens": 11}):
        r = c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": q}],
            temperature=0,
            **({"max_tokens": 12} | kw),
        )
        assert r.headers["x-llmopt-cache"] == ("off" if "extra_body" in kw else "miss")
    sampled = c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": q}], temperature=0.9, max_tokens=4
    )
    assert sampled.headers["x-llmopt-cache"] == "off"
    assert (
        'llmopt_response_cache_total{kind="exact",result="hit"}'
        in httpx.get(live.url + "/metrics").text
    )


def test_semantic_cache_hits_paraphrase_and_misses_unrelated(smollm_fp32) -> None:
    from llmopt.server.embedder import MiniLMEmbedder

    config = ServerConfig(model_name=MODEL, semantic_threshold=0.9)
    with start(smollm_fp32, config, MiniLMEmbedder()) as s:
        c = client(s)

        def cached(q: str) -> tuple[str, str]:
            r = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=10
            )
            return r.headers["x-llmopt-cache"], r.parse().choices[0].message.content

        header, answer = cached("What is the capital of France?")
        assert header == "miss"
        assert cached("What's the capital city of France?") == ("hit-semantic", answer)
        assert cached("How do I bake bread at home?")[0] == "miss"
        metrics = httpx.get(s.url + "/metrics").text
        assert 'llmopt_response_cache_total{kind="semantic",result="hit"} 1.0' in metrics


def test_metrics_exposes_engine_and_latency_series(live) -> None:
    ask(client(live), "Hello!", max_tokens=4, extra_body={"cache": False})
    text = httpx.get(live.url + "/metrics").text
    for name in (
        "llmopt_requests_running",
        "llmopt_requests_waiting",
        "llmopt_kv_blocks_used",
        "llmopt_kv_blocks_total",
        "llmopt_prefix_cache_hit_rate",
        "llmopt_time_to_first_token_seconds_bucket",
        "llmopt_inter_token_latency_seconds_bucket",
        "llmopt_e2e_request_latency_seconds_count",
        "llmopt_prompt_tokens_total",
    ):
        assert name in text, name
    total = next(line for line in text.splitlines() if line.startswith("llmopt_kv_blocks_total"))
    assert float(total.split()[1]) > 0


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
