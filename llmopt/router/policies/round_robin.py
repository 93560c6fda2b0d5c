"""round-robin: each request to the next replica in turn, blind to load and content."""

from __future__ import annotations

from collections.abc import Sequence

from llmopt.router.policies.base import Policy
from llmopt.router.state import ReplicaState, RouteRequest


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self.turn = 0

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        self.turn += 1
        return replicas[self.turn % len(replicas)]
