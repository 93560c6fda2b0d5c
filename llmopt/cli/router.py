"""`llmopt router`: an OpenAI-compatible front over replicas (see llmopt/router/app.py).

Replicas are URLs of `llmopt serve` or any OpenAI-compatible server (--replica,
--replicas-file), or N local `llmopt serve` processes it starts itself (--spawn N
MODEL), or both. The spawning lives here and not in `serve --replicas N`: serve stays
one engine in one process, and the router is the one command that owns a fleet,
local or remote. SIGTERM or Ctrl-C stops accepting, lets the requests in flight
finish (up to --drain-timeout), then stops the spawned replicas the same way.
"""

from __future__ import annotations

import dataclasses
import shlex
import signal
from pathlib import Path
from types import FrameType

import typer
from rich.console import Console

from llmopt.cli.serve import _bind
from llmopt.errors import UsageError
from llmopt.router.config import RouterConfig
from llmopt.router.policies import POLICIES


def _read_replicas(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UsageError(f"cannot read --replicas-file {path}: {e.strerror or e}") from None
    return [s for line in lines if (s := line.split("#")[0].strip())]


def router(
    model: str = typer.Argument(None, help="With --spawn: the model each replica serves."),
    replica: list[str] = typer.Option([], "--replica", help="Replica base URL (repeatable)."),
    replicas_file: Path = typer.Option(None, "--replicas-file", help="One URL per line."),
    spawn: int = typer.Option(0, "--spawn", help="Start N local `llmopt serve` replicas."),
    threads: int = typer.Option(
        None, "--threads", help="CPU threads split between spawned replicas (default: all)."
    ),
    serve_args: str = typer.Option(
        "", "--serve-args", help="More options for spawned replicas, e.g. '--dtype float32'."
    ),
    policy: str = typer.Option(
        "least-connections", "--policy", help=f"One of: {', '.join(POLICIES)}."
    ),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port", "-p"),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LLMOPT_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    replica_api_key: str = typer.Option(
        None,
        "--replica-api-key",
        envvar="LLMOPT_REPLICA_API_KEY",
        help="Key to send replicas (default: forward the client's Authorization).",
    ),
    health_interval: float = typer.Option(2.0, "--health-interval", help="Seconds."),
    max_attempts: int = typer.Option(3, "--max-attempts", help="Replicas tried per request."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="Seconds, on shutdown."),
    log_level: str = typer.Option("info", "--log-level"),
) -> None:
    """Route OpenAI-compatible requests over several replicas."""
    import uvicorn

    from llmopt.router.app import create_app
    from llmopt.router.spawn import LocalReplicas, cpu_threads

    console = Console(stderr=True)
    urls = [*replica, *(_read_replicas(replicas_file) if replicas_file else [])]
    if spawn < 0 or (spawn and model is None):
        raise UsageError("--spawn N needs N >= 1 and a MODEL")
    if model is not None and not spawn:
        raise UsageError("a MODEL is only for --spawn N; give replicas with --replica URL")
    if not urls and not spawn:
        raise UsageError("give at least one --replica URL, a --replicas-file, or --spawn N MODEL")
    # Everything that can be refused is refused before any replica starts.
    config = RouterConfig(
        replicas=tuple(urls),
        policy=policy,
        api_key=api_key,
        replica_api_key=replica_api_key,
        health_interval_s=health_interval,
        max_attempts=max_attempts,
        request_timeout_s=request_timeout,
        drain_timeout_s=drain_timeout,
    )
    sock = _bind(host, port)
    local = None
    if spawn:
        local = LocalReplicas(model, spawn, threads or cpu_threads(), shlex.split(serve_args))
        console.print(f"starting {spawn} replicas of {model}: {', '.join(local.urls)}")
        local.wait_ready(timeout_s=300)
        config = dataclasses.replace(config, replicas=(*urls, *local.urls))
    try:
        console.print(
            f"routing at http://{host}:{sock.getsockname()[1]}/v1 over "
            f"{len(config.replicas)} replicas ({policy})",
            highlight=False,
        )
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(config),
                log_level=log_level,
                timeout_graceful_shutdown=int(drain_timeout),
            )
        )
        # uvicorn re-raises the signal that stopped it once it has drained, and
        # SIGTERM's default action would end this process before the `finally` below
        # stops the spawned replicas (they were left running). As an exception it
        # unwinds through it.
        signal.signal(signal.SIGTERM, _stopped)
        server.run(sockets=[sock])
    finally:
        if local is not None:
            local.stop()


def _stopped(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)  # drained already: a clean stop
