"""prefix-aware: send a prompt where its longest prefix was served before (that replica
likely still caches its KV, and skips that prefill), unless that replica is much busier
than the least-loaded one; then, or when no replica matched enough of the prompt, the
least-loaded replica. The idea of SGLang's cache-aware router.

Imbalance is judged between the matched replica and the least-loaded one (SGLang looks
at the fleet's max and min): over a large fleet the extremes are almost always far
apart, which would turn the policy into least-connections.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmopt.router.policies.base import Policy, least_loaded
from llmopt.router.state import ReplicaState, RouteRequest


class PrefixAware(Policy):
    name = "prefix-aware"

    def __init__(
        self, min_match: float = 0.3, balance_abs: int = 2, balance_rel: float = 1.0
    ) -> None:
        self.min_match = min_match  # share of the prompt's chunks a match must cover
        self.balance_abs = balance_abs  # in-flight requests more than the least-loaded...
        self.balance_rel = balance_rel  # ...and this many times as many: imbalanced

    def choose(self, request: RouteRequest, replicas: Sequence[ReplicaState]) -> ReplicaState:
        idle = least_loaded(replicas)
        by_name = {r.name: r for r in replicas}
        depth, holders = request.prefix.deepest(by_name)
        if not depth or depth < self.min_match * request.prefix.chunks:
            return idle
        best = least_loaded([by_name[h] for h in holders])
        gap = best.in_flight - idle.in_flight
        if gap > self.balance_abs and best.in_flight > self.balance_rel * idle.in_flight:
            return idle
        return best
