"""One engine replica of a `llmopt cluster` deployment: llmopt's own OpenAI server
(server/app.py) over its own engines, answering the requests the ingress hands it
through Ray, with no HTTP server of its own (asgi.py).

Everything a plain `llmopt serve` does for a request happens here unchanged:
validation and OpenAI-shaped errors, the model's lease and load within the memory
budget, the context and queue checks, the response cache, streaming token by token.
Its routing stats tell the request router which models it serves and holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from rich.console import Console

from llmopt.cluster import asgi
from llmopt.cluster.spec import ReplicaSpec
from llmopt.device import resolve_device
from llmopt.router.request_view import RequestView
from llmopt.server.app import create_app
from llmopt.server.model_manager import ModelManager
from llmopt.server.service import Server
from llmopt.store.resolve import resolve
from llmopt.store.store import Store

REPLICA_HEADER = "X-Llmopt-Replica"  # which replica answered: Ray's id for it


def build_manager(spec: ReplicaSpec) -> ModelManager:
    """The models resolved on this machine (pulled into its store if need be), with
    `llmopt serve`'s defaults (ModelManager.with_defaults)."""
    store, console = Store(), Console(stderr=True)
    models = []
    for typed in spec.models:
        name, path = resolve(typed, store, console)
        models.append((name, spec.engine.replace(model=str(path))))
    device = resolve_device(spec.engine.device)
    return ModelManager.with_defaults(models, device, spec.memory_budget_gb, spec.keep_alive_s)


class EngineReplica:
    async def __init__(self, spec: ReplicaSpec) -> None:
        self.name = serve.get_replica_context().replica_id.unique_id
        self._reports = 0
        self.manager = build_manager(spec)
        if len(spec.models) == 1:  # as serve: a lone model loads at start
            await asyncio.to_thread(self.manager.preload)
        self.app = create_app(Server(self.manager, spec.server))
        # The app's lifespan runs the keep-alive reaper, and stops the engines on exit.
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] = (
            self.app.router.lifespan_context(self.app)
        )
        await self._lifespan.__aenter__()

    async def forward(
        self,
        view: RequestView,  # for the request router only (request_router.py reads it)
        method: str,
        path: str,
        body: bytes,
        headers: dict[str, str],
    ) -> AsyncIterator[asgi.Head | bytes]:
        """The server's answer to one HTTP request: its head, then its body's pieces
        (a streamed answer's events one by one, as the engine makes its tokens)."""
        async for item in asgi.call(self.app, method, path, body, headers):
            if isinstance(item, tuple):
                status, pairs = item
                item = status, [*pairs, (REPLICA_HEADER, self.name)]
            yield item

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the request router's model-aware policy reads: the models served, those
        loaded (least recently used first) and how many fit at once (None: all)."""
        self._reports += 1  # a new report, even where it says what the last one did
        models = self.manager.models.values()
        loaded = sorted((m for m in models if m.engine is not None), key=lambda m: m.last_used)
        return {
            "report": self._reports,
            "models": [m.name for m in models],
            "loaded": [m.name for m in loaded],
            "max_loaded": self.manager.max_loaded(),
        }

    async def __del__(self) -> None:
        lifespan = getattr(self, "_lifespan", None)  # None: the constructor failed first
        if lifespan is not None:
            await lifespan.__aexit__(None, None, None)
