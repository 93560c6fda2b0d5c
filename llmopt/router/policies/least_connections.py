"""least-connections: the replica with the fewest requests in flight (then the fewest
outstanding tokens), so that a replica stuck on long answers gets no more until it
catches up."""

from __future__ import annotations

from collections.abc import Sequence

from llmopt.router.policies.base import Policy, least_loaded
from llmopt.router.state import ReplicaState, RouteRequest


class LeastConnections(Policy):
    name = "least-connections"

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        return least_loaded(replicas)
