"""model-aware: keep each model on the replicas that already hold it; load it somewhere
new (a cold start) only when those are busy.

The least-loaded replica holding the model takes the request unless it already has
`spill_at` requests in flight; then the least-loaded replica with a free model slot
(else the least-loaded of all) loads the model. Without the spill, the most popular
model would pile onto the first replica that ever served it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmopt.router.policies.base import Policy, least_loaded
from llmopt.router.state import ReplicaState, RouteRequest


class ModelAware(Policy):
    name = "model-aware"

    def __init__(self, spill_at: int = 32) -> None:
        self.spill_at = spill_at

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        warm = [r for r in replicas if r.is_loaded(request.model)]
        if warm:
            best = least_loaded(warm)
            if best.in_flight < self.spill_at or len(warm) == len(replicas):
                return best
        roomy = [r for r in replicas if r.has_room()]
        return least_loaded(roomy or replicas)
