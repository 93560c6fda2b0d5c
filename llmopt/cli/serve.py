"""`llmopt serve [MODEL] [--model MODEL ...]`: the OpenAI-compatible HTTP server (see
llmopt/server/app.py), over one model or several.

One model is loaded at start and stays loaded, unless --keep-alive or --memory-budget
say otherwise. Several models share a memory budget: each is loaded on its first
request (every one at start with --preload) and unloaded when idle past --keep-alive,
or, least recently used first, to make room for another (server/model_manager.py).
Every model is resolved (and pulled if need be) at start: a typo fails at once, and a
client can only ask for the models named here.

Binds 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl-C stops accepting new
connections, lets the requests in flight finish, then exits.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from llmopt.cli.engine_options import LOADING, engine_options
from llmopt.config import ServerConfig
from llmopt.device import resolve_device
from llmopt.engine.config import SPECULATION, EngineConfig
from llmopt.errors import LlmoptError, UsageError
from llmopt.store.resolve import resolve
from llmopt.store.store import Store

if TYPE_CHECKING:
    import torch
    import uvicorn

    from llmopt.engine.async_engine import AsyncEngine
    from llmopt.server.model_manager import ModelManager


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
    more_models: list[str] = typer.Option(
        None, "--model", help="Another model to serve (repeatable); clients pick one by name."
    ),
    memory_budget: float = typer.Option(
        None,
        "--memory-budget",
        help="GB for the loaded models' weights and KV caches together; the least "
        "recently used idle model is unloaded to make room, and each KV cache is "
        "--kv-cache-memory or a tenth of the budget. Default with several models: half "
        "the RAM (90% of the GPU's memory on CUDA); with one: no limit.",
    ),
    keep_alive: float = typer.Option(
        None,
        "--keep-alive",
        help="Seconds an idle model stays loaded (0: unload once idle; -1: never). "
        "Default: 300 with several models, -1 with one.",
    ),
    preload: bool = typer.Option(
        None,
        "--preload/--no-preload",
        help="Load every model at start (default: only a lone model; several load on "
        "their first request).",
    ),
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
    """Serve one model or several over an OpenAI-compatible HTTP API."""
    import uvicorn

    from llmopt.server.app import create_app
    from llmopt.server.embedder import MiniLMEmbedder
    from llmopt.server.service import Server

    console = Console(stderr=True)
    if engine.ranks > 1:
        from llmopt.engine import parallel
        from llmopt.engine.factory import open_engine

        if parallel.is_worker():
            # torchrun runs this command on every rank: the others serve the driver's
            # steps (and exit when it stops), the driver serves HTTP.
            open_engine(engine.replace(model=model))
            return
    config = ServerConfig(
        api_key=api_key,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        response_cache=response_cache,
        cache_ttl_s=cache_ttl,
        cache_max_entries=cache_size,
        semantic_threshold=semantic_threshold if semantic_cache else None,
    )
    specs = ([model] if model else []) + list(more_models or []) or [None]
    several = len(specs) > 1
    if several and served_name:
        raise UsageError("--served-model-name names a lone model; several are served by name")
    if keep_alive is not None and keep_alive < 0 and keep_alive != -1:
        raise UsageError(f"--keep-alive must be seconds >= 0, or -1 for never, not {keep_alive}")
    if memory_budget is not None and memory_budget <= 0:
        raise UsageError(f"--memory-budget must be a positive number of GB, not {memory_budget}")
    # Everything that can be refused is refused before a model loads.
    embedder = MiniLMEmbedder(embedding_model) if semantic_cache else None
    device = resolve_device(engine.device)  # e.g. --device cuda without CUDA
    sock = _bind(host, port)
    manager = _manager(specs, served_name, engine, device, memory_budget, keep_alive, console)
    if preload is None:
        preload = not several
    # A lone model loaded for good is reported as before, in one line; otherwise every
    # load and unload is.
    lone = not several and preload and not manager.managed
    if not lone:
        manager.log = lambda message: console.print(message, highlight=False, soft_wrap=True)
    if preload:  # engines in processes of their own, loading the models resolved here
        manager.preload()
    app = create_app(Server(manager, config, embedder))
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    console.print(_serving_line(manager, url, api_key is not None, lone), highlight=False)
    # timeout_graceful_shutdown None: on SIGTERM, wait for every request in flight.
    server = uvicorn.Server(
        uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None)
    )
    lost: list[int] = []
    if lone and engine.ranks > 1:
        _stop_if_lost(manager.loaded()[0].engine, server, lost)
    server.run(sockets=[sock])
    if lost:
        raise LlmoptError("the server stopped: its model's engine ended (the error is above)")


def _stop_if_lost(engine: AsyncEngine | None, server: uvicorn.Server, lost: list[int]) -> None:
    """A model split over ranks cannot answer without all of them: when its engine
    process ends while the server is not stopping (a rank lost: engine_process's
    MODEL_LOST, or anything else that ended it), the server stops too."""
    from multiprocessing.connection import wait as mp_wait

    process = engine.process if engine is not None else None
    if process is None:
        return

    def watch() -> None:
        mp_wait([process.process.sentinel])  # it has exited
        if not server.should_exit:  # not the shutdown's own stop
            lost.append(1)
            server.should_exit = True

    threading.Thread(target=watch, name="llmopt-rank-watch", daemon=True).start()


def _manager(
    specs: list[str | None],
    served_name: str | None,
    engine: EngineConfig,
    device: torch.device,
    memory_budget: float | None,
    keep_alive: float | None,
    console: Console,
) -> ModelManager:
    """The models, resolved, with the defaults for one model (no budget, loaded for good)
    or several (a share of the memory, keep-alive 300 s)."""
    from llmopt.server.budget import gb
    from llmopt.server.model_manager import ModelManager

    models = _models(specs, served_name, engine, console)
    manager = ModelManager.with_defaults(models, device, memory_budget, keep_alive)
    budget = manager.budget_bytes
    for m in manager.models.values():
        if budget is not None and m.bytes > budget:
            console.print(
                f"[yellow]warning:[/yellow] {m.name} needs about {gb(m.bytes)}, more than "
                f"the memory budget of {gb(budget)}: its requests will get 503",
                highlight=False,
                soft_wrap=True,
            )
    return manager


def _models(
    specs: list[str | None], served_name: str | None, engine: EngineConfig, console: Console
) -> list[tuple[str, EngineConfig]]:
    """Each model's served name and config, its model resolved to a path (pulled from
    the registry if need be)."""
    store = Store()
    out: dict[str, EngineConfig] = {}
    for spec in specs:
        name, path = resolve(spec, store, console)
        name = served_name or name
        if name in out:
            raise UsageError(f"the model {name} is given twice")
        out[name] = engine.replace(model=str(path))
    return list(out.items())


def _serving_line(manager: ModelManager, url: str, keyed: bool, lone: bool) -> str:
    from llmopt.server.budget import gb

    key = ", API key required" if keyed else ""
    models = list(manager.models.values())
    if lone:
        m, e = models[0], models[0].engine
        assert e is not None
        return (
            f"serving [bold]{m.name}[/bold] at {url} "
            f"(context {e.max_context} tokens, "
            f"KV cache {e.kv_capacity_tokens} tokens: {e.kv_cache_description}; "
            f"weights and KV cache {gb(e.memory_bytes)}, engine resident "
            f"{gb(e.resident_bytes)}{key})"
        )
    names = ", ".join(f"[bold]{m.name}[/bold]" for m in models)
    b = manager.budget_bytes
    budget = "no memory budget" if b is None else f"memory budget {gb(b)}"
    keep = manager.keep_alive_s
    idle = "never unloaded when idle" if keep is None else f"keep-alive {keep:g} s"
    return f"serving {names} at {url} ({budget}, {idle}{key})"
