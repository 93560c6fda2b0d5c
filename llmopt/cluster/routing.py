"""llmopt's routing policies driven by an external request router (Ray Serve's), the
way the live router (router/proxy.py) drives them: one ReplicaState per replica, the
prefix index of what was sent where, and the same counts on start and finish.

Ray-free, so that it is tested without a cluster: request_router.py only translates
Ray's replicas and requests into the calls here.

A replica reports what it serves with its routing stats (replica.py's
record_routing_stats: its models, those loaded, how many fit at once), as a router
replica's /v1/status does. Between two reports the state counts the requests sent
since (in flight, the model each loaded), as the router's does between health checks.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from llmopt.router.metrics import RouterMetrics
from llmopt.router.policies import make_policy
from llmopt.router.prefix_index import PrefixIndex
from llmopt.router.request_view import RequestView, route_for
from llmopt.router.state import ReplicaState, RouteRequest

ANY_REQUEST = RequestView(None, "", 0)  # a request without a body (GET /v1/models)
MAX_PENDING = 4096  # requests ranked and not yet started

# The PolicyRoutings Ray built in this process, by deployment, for the ingress's
# /metrics (Ray builds its request routers itself; nobody can hand one over). Here, in
# a module both reach by reference: Ray ships the ingress class by value (cloudpickle),
# and a module-level name it reads could be a copy. Written from Ray's router thread,
# read from the ingress's: hence the lock.
REGISTRY: dict[str, PolicyRouting] = {}
REGISTRY_LOCK = threading.Lock()


def apply_stats(state: ReplicaState, stats: Mapping[str, Any]) -> None:
    """A replica's reported models onto its state (nothing if it has not reported)."""
    if "models" not in stats:
        return
    state.models = frozenset(stats["models"])
    state.loaded = list(stats["loaded"])
    state.max_loaded = stats["max_loaded"]


class PolicyRouting:
    def __init__(self, policy: str, **options: Any) -> None:
        self.policy = make_policy(policy, **options)
        self.index = PrefixIndex()
        self.states: dict[str, ReplicaState] = {}
        self._reported: dict[str, Mapping[str, Any]] = {}  # the stats last applied
        self._routes: dict[str, tuple[RouteRequest, list[int]]] = {}  # by request id
        # the requests started, by (request id, replica)
        self._running: dict[tuple[str, str], tuple[ReplicaState, RouteRequest]] = {}
        self.metrics = RouterMetrics(self.policy.name, lambda: list(self.states.values()))

    def update(self, replicas: Mapping[str, Mapping[str, Any]]) -> None:
        """The replicas running now, by name, with their latest routing stats. A report
        is applied once (each is numbered): Ray hands the last one over on every call
        until the next, and the counts made since it must stay."""
        for gone in set(self.states) - set(replicas):
            del self.states[gone]
            self._reported.pop(gone, None)
            self.index.forget(gone)  # a replacement starts with an empty cache
        for name, stats in replicas.items():
            state = self.states.setdefault(name, ReplicaState(name))
            if self._reported.get(name) != stats:
                apply_stats(state, stats)
                self._reported[name] = dict(stats)

    def route(self, request_id: str, view: RequestView | None) -> RouteRequest:
        """The request as the policies see it; built once per request, however many
        times it is ranked (Ray ranks it again when a replica refused it)."""
        if request_id not in self._routes:
            self._routes[request_id] = route_for(view or ANY_REQUEST, self.index)
            # A request cancelled before any replica took it is never started: forget
            # the oldest such rather than grow without end.
            while len(self._routes) > MAX_PENDING:
                del self._routes[next(iter(self._routes))]
        return self._routes[request_id][0]

    def rank(
        self, request_id: str, view: RequestView | None, names: Sequence[str]
    ) -> list[list[str]]:
        """The replicas to try, best first: the policy's choice alone, then the other
        candidates (Ray takes the next rank when a replica is at its request limit).
        Candidates are the named replicas that serve the request's model, or all of
        them if none is known to."""
        route = self.route(request_id, view)
        states = [self.states[n] for n in names if n in self.states]
        candidates = [s for s in states if s.serves(route.model)] or states
        if not candidates:
            return [list(names)] if names else []
        chosen = self.policy.choose(route, candidates)
        rest = [s.name for s in candidates if s is not chosen]
        return [[chosen.name], rest] if rest else [[chosen.name]]

    def started(self, request_id: str, name: str) -> None:
        """Replica `name` accepted the request: count it there, as the router does."""
        state = self.states.get(name)
        routed = self._routes.pop(request_id, None)
        if state is None or routed is None:
            return
        route, keys = routed
        cold = state.start(route)
        self.metrics.started(name, cold=cold, prefix_hit=route.prefix.depth(name) > 0)
        self.index.insert(keys, name)
        self._running[(request_id, name)] = (state, route)

    def finished(self, request_id: str, name: str) -> None:
        """The request's attempt on replica `name` ended: answered, failed, cancelled,
        or refused there (then Ray ranks it again, and it starts elsewhere)."""
        running = self._running.pop((request_id, name), None)
        if running is not None:
            state, route = running
            state.finish(route)
