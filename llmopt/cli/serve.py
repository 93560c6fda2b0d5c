"""`llmopt serve [MODEL]`: the OpenAI-compatible HTTP server (see llmopt/server/app.py).

Binds 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl-C stops accepting new
connections, lets the requests in flight finish, then exits.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import typer
from rich.console import Console

from llmopt.cli.engine_options import LOADING, engine_options
from llmopt.config import ServerConfig
from llmopt.device import resolve_device
from llmopt.engine.async_engine import AsyncEngine
from llmopt.engine.config import SPECULATION, EngineConfig
from llmopt.errors import UsageError
from llmopt.store.resolve import resolve
from llmopt.store.store import Store


def _bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so that a taken port fails in a second, clearly."""
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port (0-65535)")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


@engine_options(
    *LOADING,
    *SPECULATION,
    "max_num_seqs",
    "max_num_batched_tokens",
    "batching",
    "prefix_cache",
)
def serve(
    model: str = typer.Argument(None, help="Registry name, .gguf file or HF folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0: all)."),
    port: int = typer.Option(8000, "--port", "-p"),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LLMOPT_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    served_name: str = typer.Option(None, "--served-model-name", help="Model id for clients."),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before 429."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds."),
    response_cache: bool = typer.Option(True, "--response-cache/--no-response-cache"),
    cache_ttl: float = typer.Option(3600.0, "--cache-ttl", help="Response-cache TTL, seconds."),
    cache_size: int = typer.Option(1024, "--cache-size", help="Response-cache entries."),
    semantic_cache: bool = typer.Option(
        False, "--semantic-cache", help="Also answer paraphrases from the cache."
    ),
    semantic_threshold: float = typer.Option(
        0.9, "--semantic-threshold", help="Cosine similarity a paraphrase needs."
    ),
    embedding_model: Path = typer.Option(
        None, "--embedding-model", help="all-MiniLM-L6-v2 folder (default: the PyPI package)."
    ),
    log_level: str = typer.Option("info", "--log-level"),
    *,
    engine: EngineConfig,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API."""
    import uvicorn

    from llmopt.server.app import create_app
    from llmopt.server.embedder import MiniLMEmbedder
    from llmopt.server.service import Server

    console = Console(stderr=True)
    config = ServerConfig(
        model_name=served_name or "",
        api_key=api_key,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        response_cache=response_cache,
        cache_ttl_s=cache_ttl,
        cache_max_entries=cache_size,
        semantic_threshold=semantic_threshold if semantic_cache else None,
    )
    # Everything that can be refused is refused before the model loads.
    embedder = MiniLMEmbedder(embedding_model) if semantic_cache else None
    resolve_device(engine.device)  # e.g. --device cuda without CUDA
    sock = _bind(host, port)
    name, path = resolve(model, Store(), console)
    # The engine runs in a process of its own, loading the model resolved here.
    generator = AsyncEngine.spawn(engine.replace(model=str(path)))
    config = dataclasses.replace(config, model_name=served_name or name)
    app = create_app(Server(generator, config, embedder))
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    console.print(
        f"serving [bold]{config.model_name}[/bold] at {url} "
        f"(context {generator.max_context} tokens, "
        f"KV cache {generator.kv_capacity_tokens} tokens: {generator.kv_cache_description}"
        f"{', API key required' if api_key else ''})",
        highlight=False,
    )
    # timeout_graceful_shutdown None: on SIGTERM, wait for every request in flight.
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None)
    )
    server.run(sockets=[sock])
