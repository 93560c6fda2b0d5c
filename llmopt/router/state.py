"""What a routing policy sees: a request (RouteRequest) and the replicas that could take
it (ReplicaState). The live router and the fleet simulator both keep their replicas'
state in ReplicaState and call the same policies on it: one implementation, two drivers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from llmopt.router.prefix_index import PrefixMatch


class RouteRequest(NamedTuple):
    model: str | None  # None: the client named none; any replica will do
    tokens: int  # the prompt's and the answer's tokens, estimated (outstanding work)
    prefix: PrefixMatch  # which replicas served how much of the prompt before


@dataclass(eq=False)
class ReplicaState:
    """One replica as the router knows it.

    `models` is what it can serve (empty: not known yet, so anything); `loaded` the
    models whose weights it holds, least recently used first. `max_loaded` None means
    every model it serves is always loaded (a plain `llmopt serve`); a number means
    serving another model costs a load (a cold start) and evicts the least recently
    used one.
    """

    name: str
    models: frozenset[str] = frozenset()
    loaded: list[str] = field(default_factory=list)
    max_loaded: int | None = None
    healthy: bool = True
    in_flight: int = 0  # requests sent and not finished
    outstanding_tokens: int = 0  # their estimated tokens

    def serves(self, model: str | None) -> bool:
        return model is None or not self.models or model in self.models

    def is_loaded(self, model: str | None) -> bool:
        return model is None or model in self.loaded or self.max_loaded is None

    def has_room(self) -> bool:
        return self.max_loaded is None or len(self.loaded) < self.max_loaded

    def start(self, request: RouteRequest) -> bool:
        """Count a request sent here; True if it is a cold start (its model had to load)."""
        self.in_flight += 1
        self.outstanding_tokens += request.tokens
        model = request.model
        if model is None or self.max_loaded is None:
            return False
        cold = model not in self.loaded
        if not cold:
            self.loaded.remove(model)
        self.loaded.append(model)
        del self.loaded[: max(0, len(self.loaded) - self.max_loaded)]
        return cold

    def finish(self, request: RouteRequest) -> None:
        self.in_flight -= 1
        self.outstanding_tokens -= request.tokens
