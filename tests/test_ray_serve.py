"""`llmopt cluster` on a local Ray cluster of 2 CPUs: two engine replicas of the real
SmolLM2 (one CPU each) behind the ingress, routed by the prefix-aware policy as Ray
Serve's request router. Under the openai client, streamed and not: the greedy answer
is llmopt.LLM's; a repeated prefix goes back to the replica that served it while a
new prompt goes to the idle one; bad requests get OpenAI-shaped errors. Skipped where
Ray Serve is not installed (pip install 'llmopt[cluster]')."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from llmopt.config import ServerConfig
from llmopt.engine.config import EngineConfig
from tests.conftest import REAL_HOME
from tests.server_helpers import metrics

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

MODEL = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parent.parent
ENGINE = EngineConfig(max_context=1024, kv_cache_memory=0.05)
SYSTEM = "You are a helpful assistant who answers in one short sentence. " * 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(smollm_gguf):
    from ray import serve

    from llmopt.cluster.deploy import deploy
    from llmopt.cluster.spec import ClusterConfig, ReplicaSpec

    # The replicas import this checkout and read the model from the real store.
    env = {"PYTHONPATH": str(REPO), "LLMOPT_HOME": str(REAL_HOME)}
    ray.init(
        address="local",  # a Ray of its own, even where this machine runs a cluster
        num_cpus=2,
        include_dashboard=False,
        logging_level="warning",
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    try:
        config = ClusterConfig(
            ReplicaSpec((MODEL,), ENGINE, ServerConfig(response_cache=False)),
            replicas=2,
            replica_cpus=1,
            policy="prefix-aware",
            port=_free_port(),
            stats_period_s=0.5,
        )
        deploy(config)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


def _ask(url: str, question: str, system: bool = True, **kw):
    """(the answer's text, the replica that answered)."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    raw = _client(url).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[*messages, {"role": "user", "content": question}],
        temperature=0,
        **kw,
    )
    return raw.parse().choices[0].message.content, raw.headers["x-llmopt-replica"]


@pytest.fixture(scope="module")
def reference(smollm_gguf):
    """llmopt.LLM's greedy answers, on one thread as each replica's engine runs."""
    import torch

    from llmopt import LLM, SamplingParams

    threads = torch.get_num_threads()
    try:
        llm = LLM(str(smollm_gguf), config=ENGINE.replace(threads=1))
        tok = llm.loaded.tokenizer

        def answer(question: str, max_tokens: int) -> str:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ]
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            return llm.generate([tok.encode_chat(messages)], params)[0].text

        yield answer
    finally:
        torch.set_num_threads(threads)  # the engine set it for the whole test process


def test_greedy_answers_match_llm_streamed_and_not(cluster, reference) -> None:
    question = "What is the capital of France?"
    expected = reference(question, 20)  # past the answer's end: its 20 tokens, whatever
    text, _ = _ask(cluster, question, max_tokens=20, extra_body={"ignore_eos": True})
    assert text == expected
    # Streamed: the same text, token by token, the first piece well before the last.
    started, arrivals, pieces = time.monotonic(), [], []
    stream = _client(cluster).chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        temperature=0,
        max_tokens=20,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == expected
    assert len(pieces) >= 15 and arrivals[0] < 0.7 * arrivals[-1]


def test_prefix_aware_routing_across_the_two_replicas(cluster) -> None:
    """A long streamed answer holds one replica; a prompt that shares nothing with it
    meanwhile goes to the other (the least loaded); the client that leaves the stream
    ends its generation; then each prompt's follow-up, sharing its prefix, goes back to
    the replica that served it. Ray's own router would pick at random."""
    story, colours = "Tell me a long story.", "Unrelated: " + "name a colour. " * 12
    with _client(cluster).chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": story}],
        max_tokens=800,
        stream=True,
        extra_body={"ignore_eos": True},
    ) as streaming:
        story_replica = streaming.headers["x-llmopt-replica"]
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))  # under way
        colours_replica = _ask(cluster, colours, system=False, max_tokens=4)[1]
    assert story_replica != colours_replica
    deadline = time.monotonic() + 20  # the story's replica stops: nothing is in flight
    while any(v for k, v in metrics(cluster).items() if k.startswith("llmopt_router_in_flight")):
        assert time.monotonic() < deadline, "the abandoned stream was not cancelled"
        time.sleep(0.2)
    assert _ask(cluster, story, max_tokens=2)[1] == story_replica
    assert _ask(cluster, colours + " Another?", system=False, max_tokens=2)[1] == colours_replica
    series = metrics(cluster)
    sent = {k: v for k, v in series.items() if k.startswith("llmopt_router_requests_total")}
    assert len(sent) == 2 and all('policy="prefix-aware"' in k for k in sent)
    hits = sum(v for k, v in series.items() if k.startswith("llmopt_router_prefix_hits_total"))
    assert hits >= 2


def test_bad_requests_get_openai_errors(cluster) -> None:
    c = _client(cluster)
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here"):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # refused by the replica
        c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-3
        )
    bad = httpx.post(cluster + "/v1/chat/completions", content=b"{not json", timeout=30)
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == "the request body is not valid JSON"
    assert [m.id for m in c.models.list().data] == [MODEL]
