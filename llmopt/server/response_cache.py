"""Response caches in front of the engine.

Exact: the key is a hash of (model, normalized prompt, every sampling field), and
only deterministic requests (temperature 0 or a fixed seed) are cached, so a hit
returns exactly what the engine would have produced.

Semantic (off by default): a request whose context (model, sampling fields and
every message but the last) matches an entry's exactly, and whose last message
embeds within `threshold` cosine similarity of the entry's, gets that entry's
answer. Paraphrases hit; an earlier conversation or other settings never do.

Both are LRU-bounded by entry count and expire after a TTL.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

K = TypeVar("K")
V = TypeVar("V")


class TTLCache(Generic[K, V]):
    """An LRU map whose entries expire `ttl_s` seconds after they were stored."""

    def __init__(
        self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        item = self._data.get(key)
        if item is None:
            return None
        if item[0] <= self.clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[1]

    def put(self, key: K, value: V) -> None:
        self._data[key] = (self.clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def live_items(self) -> list[tuple[K, V]]:
        now = self.clock()
        for key in [k for k, (expiry, _) in self._data.items() if expiry <= now]:
            del self._data[key]
        return [(k, v) for k, (_, v) in self._data.items()]

    def __len__(self) -> int:
        return len(self._data)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class _SemanticEntry(Generic[V]):
    context: str  # digest of everything but the query text
    embedding: torch.Tensor  # (D,) unit vector
    value: V


class ResponseCache(Generic[V]):
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        semantic_threshold: float | None = None,  # None: no semantic cache
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.exact: TTLCache[str, V] = TTLCache(max_entries, ttl_s, clock)
        self.semantic_threshold = semantic_threshold
        self.semantic: TTLCache[str, _SemanticEntry[V]] = TTLCache(max_entries, ttl_s, clock)

    @property
    def semantic_enabled(self) -> bool:
        return self.semantic_threshold is not None

    def get_exact(self, key: str) -> V | None:
        return self.exact.get(key)

    def get_semantic(self, context: str, embedding: torch.Tensor) -> V | None:
        """The closest entry in the same context, if similar enough."""
        assert self.semantic_threshold is not None
        entries = [e for _, e in self.semantic.live_items() if e.context == context]
        if not entries:
            return None
        sims = torch.stack([e.embedding for e in entries]) @ embedding  # (N,) cosines
        best = int(sims.argmax())
        return entries[best].value if float(sims[best]) >= self.semantic_threshold else None

    def put(self, key: str, value: V, context: str | None, embedding: torch.Tensor | None) -> None:
        self.exact.put(key, value)
        if self.semantic_enabled and context is not None and embedding is not None:
            self.semantic.put(key, _SemanticEntry(context, embedding, value))
