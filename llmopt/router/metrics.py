"""The router's Prometheus metrics, per replica and policy, in a registry of its own.

Counters are recorded as requests are routed; in-flight and health are read from the
replicas' state at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmopt.router.state import ReplicaState

LABELS = ["replica", "policy"]


class _StateCollector(Collector):
    def __init__(self, policy: str, states: Callable[[], list[ReplicaState]]) -> None:
        self.policy, self.states = policy, states

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "llmopt_router_in_flight", "Requests sent to a replica, not finished", labels=LABELS
        )
        healthy = GaugeMetricFamily(
            "llmopt_router_replica_healthy", "1 if the replica is in the rotation", labels=LABELS
        )
        for s in self.states():
            in_flight.add_metric([s.name, self.policy], s.in_flight)
            healthy.add_metric([s.name, self.policy], int(s.healthy))
        yield in_flight
        yield healthy


class RouterMetrics:
    def __init__(self, policy: str, states: Callable[[], list[ReplicaState]]) -> None:
        self.policy = policy
        self.registry = r = CollectorRegistry()
        r.register(_StateCollector(policy, states))

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"llmopt_router_{name}", doc, LABELS, registry=r)

        self.requests = counter("requests", "Requests sent to a replica")
        self.errors = counter("errors", "Replica failures: refused, 5xx, or cut mid-stream")
        self.retries = counter("retries", "Requests moved to another replica after a failure")
        self.cold_starts = counter("cold_starts", "Requests for a model the replica had to load")
        self.prefix_hits = counter(
            "prefix_hits", "Requests sent where at least one chunk of the prompt was served"
        )

    def count(self, counter: Counter, replica: str) -> None:
        counter.labels(replica, self.policy).inc()

    def started(self, replica: str, cold: bool, prefix_hit: bool) -> None:
        """A request sent to `replica`: a cold start if its model had to load there, a
        prefix hit if the replica had served part of its prompt before."""
        self.count(self.requests, replica)
        if cold:
            self.count(self.cold_starts, replica)
        if prefix_hit:
            self.count(self.prefix_hits, replica)

    def render(self) -> bytes:
        return generate_latest(self.registry)
