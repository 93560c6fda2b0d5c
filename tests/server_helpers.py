"""llmopt's OpenAI server on the real SmolLM2, in the test process, and what the
test_server*.py files ask of it (their module-scoped `live` fixture is in conftest.py)."""

from __future__ import annotations

import time

import httpx
import openai

from llmopt.config import ServerConfig
from llmopt.engine.async_engine import AsyncEngine
from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.server.app import Server, create_app
from llmopt.server.model_manager import ModelManager, ServedModel
from tests.live_server import LiveServer

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
    """The server over one engine on `loaded`, built here and loaded for good, as
    `llmopt serve MODEL` has it."""
    config_ = EngineConfig(str(loaded.folder), max_context=2048, kv_cache_memory=0.1, **engine_kw)
    engine = AsyncEngine(build_engine(loaded, config_))
    models = ModelManager([ServedModel(MODEL, config_)], spawn=lambda _: engine)
    models.preload()
    server = Server(models, config or ServerConfig(), embedder)
    live = LiveServer(create_app(server))
    live.app_server = server  # type: ignore[attr-defined]
    return live


def client(live: LiveServer, **kw) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=live.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
    )


def engine(live: LiveServer) -> AsyncEngine:
    return live.app_server.models.models[MODEL].engine  # type: ignore[attr-defined]


def load(live: LiveServer):
    return engine(live).load()


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


def metrics(url: str) -> dict[str, float]:
    """/metrics as {series: value}, a series named as Prometheus writes it:
    'name' or 'name{label="value",...}' (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out
