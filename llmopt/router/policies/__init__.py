"""The routing policies, one per file, by the name `--policy` takes."""

from __future__ import annotations

from typing import Any

from llmopt.errors import UsageError
from llmopt.router.policies.base import Policy
from llmopt.router.policies.least_connections import LeastConnections
from llmopt.router.policies.model_aware import ModelAware
from llmopt.router.policies.prefix_aware import PrefixAware
from llmopt.router.policies.round_robin import RoundRobin

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, LeastConnections, ModelAware, PrefixAware)
}


def policy_class(name: str) -> type[Policy]:
    """The policy called `name`; a UsageError lists the names."""
    if name not in POLICIES:
        raise UsageError(f"unknown policy '{name}'; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]


def make_policy(name: str, **options: Any) -> Policy:
    return policy_class(name)(**options)
