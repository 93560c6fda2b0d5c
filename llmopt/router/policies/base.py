"""The routing policy interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from llmopt.router.state import ReplicaState, RouteRequest


def least_loaded(replicas: Sequence[ReplicaState]) -> ReplicaState:
    """Fewest requests in flight, then fewest outstanding tokens; the first on a tie."""
    return min(replicas, key=lambda r: (r.in_flight, r.outstanding_tokens))


class Policy(ABC):
    """Chooses the replica for one request.

    A policy is built once per router (or simulation run) and called for every request,
    by the live router (llmopt/router/proxy.py) and by the fleet simulator
    (llmopt/router/sim/fleet.py) alike, so it must decide from its arguments and its own
    state only: no I/O, no clock, no randomness that is not seeded.

    `choose(request, replicas)` gets the candidates: healthy replicas that serve the
    request's model and have not already failed this request (the driver filters, and
    calls a policy only with at least one). It returns one of them. The driver then
    counts the request on it (ReplicaState.start: in flight, outstanding tokens, the
    loaded model, a cold start) and records its prompt in the prefix index; `finish`
    undoes the counts when the answer ends. A policy may keep state between calls
    (round-robin's position) but must not change the ReplicaStates.

    To add a policy: a file in this package with a subclass that sets `name` (what
    `--policy` takes) and list it in `policies/__init__.py`'s POLICIES.
    """

    name: ClassVar[str]

    @abstractmethod
    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        """The replica that gets `request`, one of `replicas` (never empty)."""
