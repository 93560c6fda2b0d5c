"""Putting a `llmopt cluster` deployment onto a Ray cluster: N engine replicas
(replica.py) routed by llmopt's policies (request_router.py), and the ingress
(ingress.py) in front, on Ray Serve's HTTP proxy at host:port.

Imports Ray only when called: `llmopt cluster` without Ray installed gets one line
naming the extra (require_ray)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llmopt.cluster import require_ray
from llmopt.cluster.spec import ClusterConfig, served_name

if TYPE_CHECKING:
    from ray.serve import Application
    from ray.serve.handle import DeploymentHandle

APP_NAME = "llmopt"
ENGINE_DEPLOYMENT = "llmopt-engine"


def build_app(config: ClusterConfig) -> Application:
    """The Ray Serve application (not yet running)."""
    require_ray()
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from llmopt.cluster.ingress import Ingress
    from llmopt.cluster.replica import EngineReplica
    from llmopt.cluster.request_router import LlmoptRequestRouter

    spec = config.replica
    if spec.engine.threads is None:  # each engine on its share of the CPUs, no more
        spec = dataclasses.replace(spec, engine=spec.engine.replace(threads=config.threads))
    engines = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT).options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.replica_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class=LlmoptRequestRouter,
            request_router_kwargs={"policy": config.policy},
            request_routing_stats_period_s=config.stats_period_s,
        ),
    )
    # The ingress only reads and relays: no CPU of its own to reserve, so that every
    # CPU given to Ray goes to the engines.
    ingress = serve.deployment(Ingress, name="llmopt-ingress").options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=config.replicas * config.max_ongoing_requests,
    )
    names = [served_name(m) for m in spec.models]
    return ingress.bind(engines.bind(spec), names, spec.server.api_key)


def deploy(config: ClusterConfig) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port and run the application on the Ray cluster
    this process is connected to (ray.init first). Returns the ingress's handle once
    every replica is up (their models loaded)."""
    require_ray()
    from ray import serve

    serve.start(http_options={"host": config.host, "port": config.port})
    return serve.run(build_app(config), name=APP_NAME, route_prefix="/")
