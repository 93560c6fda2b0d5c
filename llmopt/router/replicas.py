"""The live replicas: their state for the policies, their model cards for /v1/models,
and the health checks that take a replica out of the rotation and bring it back."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from llmopt.router.config import RouterConfig
from llmopt.router.prefix_index import PrefixIndex
from llmopt.router.state import ReplicaState


class Replica:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.state = ReplicaState(name=self.url, healthy=False)  # until its first check
        self.cards: list[dict[str, Any]] = []  # its /v1/models entries


class Fleet:
    def __init__(self, config: RouterConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.replicas = [Replica(u) for u in config.replicas]
        self.index = PrefixIndex()
        key = config.replica_api_key
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.state.healthy]

    def by_name(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.state.name == name)

    def models(self, healthy_only: bool = True) -> list[dict[str, Any]]:
        """The union of the (healthy) replicas' model cards, one per id."""
        cards: dict[str, dict[str, Any]] = {}
        for r in self.healthy() if healthy_only else self.replicas:
            for card in r.cards:
                cards.setdefault(card["id"], card)
        return list(cards.values())

    def candidates(self, model: str | None, tried: set[str]) -> list[ReplicaState]:
        return [
            r.state
            for r in self.replicas
            if r.state.healthy and r.state.name not in tried and r.state.serves(model)
        ]

    def mark_down(self, replica: Replica) -> None:
        """Out of the rotation until a health check passes. What it cached is
        forgotten: a replica that went down has most likely lost it."""
        replica.state.healthy = False
        self.index.forget(replica.state.name)

    async def check(self, replica: Replica) -> None:
        try:
            up = (await self.client.get(replica.url + "/health")).status_code == 200
            if up:
                await self._refresh(replica)
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            up = False
        if up:
            replica.state.healthy = True
        elif replica.state.healthy:
            self.mark_down(replica)

    async def _refresh(self, replica: Replica) -> None:
        """Its models from /v1/models; which are loaded from /v1/status where it has one
        (a replica without it is taken to hold all its models)."""
        r = await self.client.get(replica.url + "/v1/models", headers=self.headers)
        r.raise_for_status()
        cards = [c for c in r.json()["data"] if isinstance(c.get("id"), str)]
        state = replica.state
        replica.cards = cards
        state.models = frozenset(c["id"] for c in cards)
        s = await self.client.get(replica.url + "/v1/status", headers=self.headers)
        if s.status_code != 200:
            state.loaded, state.max_loaded = sorted(state.models), None
            return
        status = s.json()
        state.loaded = [m["id"] for m in status["models"] if m.get("loaded")]
        state.max_loaded = status.get("max_loaded_models")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas))

    async def keep_checking(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            await self.check_all()
