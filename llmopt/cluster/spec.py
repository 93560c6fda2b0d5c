"""What each engine replica of a `llmopt cluster` deployment serves, and how: a plain,
picklable description that Ray ships to the replicas (which may be on other machines,
so models travel as the user named them and each replica resolves them itself)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmopt.config import ServerConfig
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError
from llmopt.router.policies import policy_class


@dataclass(frozen=True)
class ReplicaSpec:
    models: tuple[str, ...]  # registry names, .gguf files or HF folders (as typed)
    engine: EngineConfig  # the engine settings every model gets (model unset)
    server: ServerConfig = field(default_factory=ServerConfig)
    memory_budget_gb: float | None = None  # None: serve's default (one model: none)
    keep_alive_s: float | None = None  # None: serve's default; -1: never unload

    def __post_init__(self) -> None:
        if not self.models:
            raise UsageError("name at least one model to serve")
        if len(set(self.models)) != len(self.models):
            raise UsageError("a model is given twice")


@dataclass(frozen=True)
class ClusterConfig:
    """The deployment: N engine replicas of `replica`, and the ingress in front."""

    replica: ReplicaSpec
    replicas: int = 2
    replica_cpus: float = 1.0  # Ray CPUs each replica reserves (and its engine's threads)
    policy: str = "least-connections"
    max_ongoing_requests: int = 64  # per replica, before Ray routes to another or queues
    stats_period_s: float = 2.0  # how often each replica reports its loaded models
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self) -> None:
        checks = [
            (self.replicas >= 1, f"--replicas must be at least 1, not {self.replicas}"),
            (self.replica_cpus > 0, f"--replica-cpus must be positive, not {self.replica_cpus:g}"),
            (self.max_ongoing_requests >= 1, "--max-ongoing-requests must be at least 1"),
            (self.stats_period_s > 0, "the stats period must be positive"),
            (0 <= self.port <= 65535, f"--port {self.port} is not a TCP port (0-65535)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        policy_class(self.policy)

    @property
    def threads(self) -> int:
        """Torch threads per engine: its share of the CPUs, at least one."""
        return max(1, int(self.replica_cpus))


def served_name(typed: str) -> str:
    """The id clients send for a model, as the replica's resolve() will name it: a
    file's or folder's name, else the registry name as typed."""
    path = Path(typed).expanduser()
    return path.name if path.exists() else typed
