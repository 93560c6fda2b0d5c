"""The event loop: Poisson arrivals are routed by a real router policy (the classes
`llmopt router --policy` uses) over the replicas' ReplicaState, kept exactly as the live
router keeps it (start/finish counts, loaded models, the prefix index), then served by
simulated replicas (replica.py)."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from llmopt.router.policies import Policy
from llmopt.router.prefix_index import PrefixIndex
from llmopt.router.sim.calibration import Calibration
from llmopt.router.sim.replica import Job, SimReplica
from llmopt.router.sim.workload import Generator, Request, Workload, model_names, popularity
from llmopt.router.state import ReplicaState, RouteRequest


@dataclass(frozen=True)
class FleetSpec:
    replicas: int = 1000
    model_slots: int = 4  # models a replica holds at once (its memory budget)
    cache_tokens: int = 20_000  # prefix-cache tokens per replica


def capacity_rps(cal: Calibration, w: Workload, seed: int, batch: int = 32) -> float:
    """Requests per second one replica sustains at `batch`, with no cache hit and no
    cold start: what a load of 100% means."""
    gen = Generator(w, seed)
    sample = [gen.request(0.0) for _ in range(4000)]
    per_token = cal.step_s(batch) / batch
    busy = sum(
        r.prompt_tokens / cal.prefill_tokens_per_s + (r.output_tokens - 1) * per_token
        for r in sample
    )
    return len(sample) / busy


def _initial_models(spec: FleetSpec, w: Workload) -> list[list[str]]:
    """Each replica starts holding one model; replicas per model follow popularity."""
    names, shares = model_names(w), popularity(w)
    plan = [
        name
        for name, share in zip(names, shares, strict=True)
        for _ in range(max(1, round(share * spec.replicas)))
    ]
    return [[plan[i % len(plan)]] for i in range(spec.replicas)]


def simulate(
    policy: Policy,
    cal: Calibration,
    w: Workload,
    spec: FleetSpec,
    load: float,
    duration: float,
    seed: int,
) -> list[Job]:
    """Every request of `duration` seconds of arrivals at `load`, run to completion."""
    rate = load * spec.replicas * capacity_rps(cal, w, seed)
    requests = Generator(w, seed).arrivals(rate, duration)
    return replay(policy, cal, spec, requests, _initial_models(spec, w))


def replay(
    policy: Policy,
    cal: Calibration,
    spec: FleetSpec,
    requests: list[Request],
    models: list[list[str]],
) -> list[Job]:
    """These requests (by arrival time), routed by `policy` over `spec.replicas`
    simulated replicas, replica i holding `models[i]` at the start, run to completion.
    scripts/check_fleet_sim.py replays the requests of a real run here."""
    index = PrefixIndex()
    sims = [
        SimReplica(
            ReplicaState(str(i), loaded=list(m), max_loaded=spec.model_slots),
            cal,
            spec.cache_tokens,
        )
        for i, m in enumerate(models)
    ]
    states = [s.state for s in sims]
    serial = itertools.count()
    # (time, serial, replica index or -1 for an arrival, version or 0, request)
    events: list[tuple[float, int, int, int, Request | None]] = [
        (r.arrival, next(serial), -1, 0, r) for r in requests
    ]
    heapq.heapify(events)

    def plan(i: int, at: float | None) -> None:
        if at is not None:
            heapq.heappush(events, (at, next(serial), i, sims[i].version, None))

    finished: list[Job] = []
    while events:
        now, _, i, version, request = heapq.heappop(events)
        if i >= 0:
            if version == sims[i].version:
                plan(i, sims[i].wake(now, finished))
            continue
        assert request is not None
        keys = index.keys(request.text)
        tokens = request.prompt_tokens + request.output_tokens
        route = RouteRequest(request.model, tokens, index.match(keys))
        state = policy.choose(route, states)
        index.insert(keys, state.name)
        j = int(state.name)
        plan(j, sims[j].admit(Job(request, route, state.start(route)), now))
    return finished
