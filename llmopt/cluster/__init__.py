"""`llmopt cluster`: llmopt engines as a Ray Serve deployment, on one machine or many.

An OpenAI-compatible ingress (ingress.py) reads each request and hands it, through a
Ray Serve handle, to one of N engine replicas (replica.py), each llmopt's own server
over its own engines. Which replica gets it is decided by llmopt's routing policies
(router/policies/), plugged into Ray Serve as its request router (request_router.py
over routing.py). Ray is an optional extra: nothing here imports it at import time
except the modules that only run inside Ray.
"""

from __future__ import annotations

from llmopt.errors import UsageError

INSTALL_HINT = "pip install 'llmopt[cluster]'"


def require_ray() -> None:
    """A UsageError naming the extra to install when Ray Serve is not importable."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise UsageError(f"Ray Serve is not installed; install it with: {INSTALL_HINT}") from None
