"""`llmopt cluster [MODEL] [--model MODEL ...]`: engine replicas as a Ray Serve
deployment behind one OpenAI-compatible endpoint (see llmopt/cluster/).

Connects to the Ray cluster this machine belongs to (`ray start --head` here, or
`ray start --address HEAD:6379` made it a worker), or to --address; without either, it
starts a Ray instance of its own on this machine. Each of the --replicas engine
replicas reserves --replica-cpus of Ray's CPUs, wherever Ray has them, and runs its
engines on that many threads; the requests are routed by --policy, llmopt's routing
policies as Ray Serve's request router. Ctrl-C or SIGTERM deletes the deployment.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading

import typer
from rich.console import Console

from llmopt.cli.engine_options import LOADING, engine_options
from llmopt.config import ServerConfig
from llmopt.engine.config import EngineConfig
from llmopt.errors import LlmoptError, UsageError
from llmopt.router.policies import POLICIES
from llmopt.store.resolve import is_model_ref
from llmopt.store.store import Store


@engine_options(*LOADING, "max_num_seqs", "max_num_batched_tokens", "prefix_cache")
def cluster(
    model: str = typer.Argument(None, help="Registry name, .gguf file or HF folder."),
    more_models: list[str] = typer.Option(
        None, "--model", help="Another model every replica serves (repeatable)."
    ),
    replicas: int = typer.Option(2, "--replicas", "-n", help="Engine replicas."),
    replica_cpus: float = typer.Option(
        1.0, "--replica-cpus", help="Ray CPUs per replica (its engines' threads)."
    ),
    policy: str = typer.Option(
        "least-connections", "--policy", help=f"One of: {', '.join(POLICIES)}."
    ),
    address: str = typer.Option(
        None,
        "--address",
        help="Ray cluster to join: 'auto', HOST:6379 or ray://HOST:10001 (default: this "
        "machine's cluster if one runs, else a new local one).",
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0: all)."),
    port: int = typer.Option(8000, "--port", "-p"),
    api_key: str = typer.Option(
        None, "--api-key", envvar="LLMOPT_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    memory_budget: float = typer.Option(
        None, "--memory-budget", help="GB per replica for its models (as serve's)."
    ),
    keep_alive: float = typer.Option(
        None, "--keep-alive", help="Seconds an idle model stays loaded (as serve's)."
    ),
    max_queue: int = typer.Option(256, "--max-queue", help="Waiting requests before 429."),
    max_ongoing: int = typer.Option(
        64, "--max-ongoing-requests", help="Requests per replica before Ray queues them."
    ),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds."),
    response_cache: bool = typer.Option(True, "--response-cache/--no-response-cache"),
    *,
    engine: EngineConfig,
) -> None:
    """Serve models from engine replicas on a Ray cluster (the extra 'cluster': Ray Serve)."""
    from llmopt.cluster import require_ray
    from llmopt.cluster.spec import ClusterConfig, ReplicaSpec

    console = Console(stderr=True)
    if engine.ranks > 1:
        raise UsageError("a cluster replica runs one engine per model; drop the parallel flags")
    store = Store()
    specs = [m for m in [model, *(more_models or [])] if m] or [store.registry.default_name()]
    for spec in specs:  # each replica resolves (and pulls) it on its own machine
        if not is_model_ref(spec, store):
            raise UsageError(
                f"unknown model '{spec}': not in the registry (llmopt models) nor a file "
                "or folder here"
            )
    # Everything that can be refused is refused before Ray starts.
    config = ClusterConfig(
        replica=ReplicaSpec(
            models=tuple(specs),
            engine=engine,
            server=ServerConfig(
                api_key=api_key,
                max_queue=max_queue,
                request_timeout_s=request_timeout,
                response_cache=response_cache,
            ),
            memory_budget_gb=memory_budget,
            keep_alive_s=keep_alive,
        ),
        replicas=replicas,
        replica_cpus=replica_cpus,
        policy=policy,
        max_ongoing_requests=max_ongoing,
        host=host,
        port=port,
    )
    require_ray()
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    from llmopt.cluster.deploy import deploy

    _check_reachable(address)
    try:
        ray.init(address=address, logging_level="warning", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"at {address}" if address else "on this machine"
        raise LlmoptError(f"cannot join or start a Ray cluster {where}: {_first_line(e)}") from None
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        need = replicas * replica_cpus
        if need > cpus:
            raise LlmoptError(
                f"{replicas} replicas of {replica_cpus:g} CPUs need {need:g} CPUs; the Ray "
                f"cluster has {cpus:g} (add machines with `ray start --address ...`, or "
                "ask for fewer)"
            )
        console.print(f"starting {replicas} replicas of {', '.join(specs)} on Ray ...")
        try:
            deploy(config)
        except (RuntimeError, RayServeException) as e:  # Ray's own "deploy failed"
            raise LlmoptError(
                f"the deployment failed: {_first_line(e)} (the replicas' logs: "
                "/tmp/ray/session_latest/logs/serve/)"
            ) from None
        console.print(
            f"serving {', '.join(specs)} at http://{host}:{port}/v1 from {replicas} replicas "
            f"({replica_cpus:g} CPUs each, {policy})",
            highlight=False,
            soft_wrap=True,
        )
        _wait_for_stop()
    finally:
        serve.shutdown()
        ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT that nothing answers at fails in seconds: Ray would retry for minutes."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError):
        raise LlmoptError(
            f"no Ray cluster answers at {address} (start one there with `ray start --head`)"
        ) from None


def _first_line(e: Exception) -> str:
    """Ray's errors run over many lines: the first says what happened."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _wait_for_stop() -> None:
    """Until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
