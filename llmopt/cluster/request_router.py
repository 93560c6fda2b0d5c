"""llmopt's routing policies as a Ray Serve request router.

Ray Serve builds one request router per deployment handle (here: in the ingress's
process, for its handle to the engine replicas) from the deployment's
RequestRouterConfig, and asks `choose_replicas` for ranks of replicas for each pending
request; it then takes, in the first rank with room, the replica with the shortest
queue. Ranking the policy's choice alone first makes that choice final unless the
replica is at its max_ongoing_requests.

The request is read from the handle call's first argument, the RequestView the
ingress built (model, prompt text, estimated tokens); the replicas' models from their
routing stats (replica.py). Everything else is routing.py, shared with the tests.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from llmopt.cluster import routing
from llmopt.cluster.routing import PolicyRouting
from llmopt.router.metrics import RouterMetrics
from llmopt.router.request_view import RequestView


def routers_metrics() -> list[RouterMetrics]:
    """The metrics of the request routers Ray built in this process (the ingress's)."""
    with routing.REGISTRY_LOCK:
        return [r.metrics for r in routing.REGISTRY.values()]


def _view(pending: PendingRequest | None) -> RequestView | None:
    if pending is None or not pending.args:
        return None
    first = pending.args[0]
    return first if isinstance(first, RequestView) else None


class LlmoptRequestRouter(RequestRouter):
    """Routes with one of llmopt's policies (request_router_kwargs: {"policy": name,
    "options": {...}}); the policies themselves are router/policies/."""

    def initialize_state(self, policy: str = "least-connections", options: Any = None) -> None:
        self.routing = PolicyRouting(policy, **(options or {}))
        with routing.REGISTRY_LOCK:
            routing.REGISTRY[self._deployment_id.name] = self.routing

    def _sync(self, replicas: list[RunningReplica]) -> None:
        self.routing.update({r.replica_id.unique_id: r.routing_stats or {} for r in replicas})

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        self._sync(candidate_replicas)
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        if pending_request is None:  # Ray asks without a request only to warm up
            return [candidate_replicas]
        # Every rank tried and all full: wait (Ray's backoff) before ranking again.
        pending_request.routing_context.should_backoff = True
        request_id = pending_request.metadata.internal_request_id
        ranks = self.routing.rank(request_id, _view(pending_request), list(by_name))
        return [[by_name[n] for n in rank] for rank in ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self.routing.started(pending_request.metadata.internal_request_id, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.routing.finished(internal_request_id, replica_id.unique_id)
