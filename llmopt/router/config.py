"""What `llmopt router` is asked to do."""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.errors import UsageError
from llmopt.router.policies import policy_class


@dataclass(frozen=True)
class RouterConfig:
    replicas: tuple[str, ...]  # base URLs, e.g. http://127.0.0.1:8001
    policy: str = "least-connections"
    api_key: str | None = None  # the router's own; None: no auth at the router
    replica_api_key: str | None = None  # for the router's own calls to replicas
    health_interval_s: float = 2.0
    max_attempts: int = 3  # replicas tried for one request before it fails
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 600.0  # longest wait for a replica's next bytes
    drain_timeout_s: float = 30.0  # on shutdown, for the requests in flight

    def __post_init__(self) -> None:
        checks = [
            (self.health_interval_s > 0, "--health-interval must be positive"),
            (self.max_attempts >= 1, "--max-attempts must be at least 1"),
            (self.request_timeout_s > 0, "--request-timeout must be positive"),
            (self.drain_timeout_s >= 0, "--drain-timeout must be >= 0"),
            (self.api_key is None or len(self.api_key) > 0, "--api-key must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        policy_class(self.policy)
        for url in self.replicas:
            if not url.startswith(("http://", "https://")):
                raise UsageError(f"replica '{url}' is not an http:// or https:// URL")
