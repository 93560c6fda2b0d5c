"""Which replicas have served which prompt prefixes: an approximate radix tree, as in
SGLang's cache-aware router. The router never sees a replica's KV cache; it remembers
what it sent where, and a replica that served a prefix recently probably still caches it.

A prompt is cut into chunks of `chunk_chars` characters (a few tokens each: the router
has no tokenizer). A node of the tree is named by the hash chained over its path
(parent's hash, chunk), so equal names mean equal whole prefixes, as the engine's KV
block hashes do, and a node is a dict entry instead of an object. Each node lists the
replicas that served it; each replica keeps at most `capacity` nodes and forgets the
least recently used first, deepest first, so what it keeps is always a whole prefix.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Container


class PrefixMatch:
    """A prompt's path down the index: the replicas holding each matched node, root
    first, and how many chunks the prompt has. A replica's nodes on a path are a prefix
    of it (eviction takes leaves first), so the replicas of a level hold every level
    above it too; the answers below rely on that, which makes them approximate after
    an eviction broke it, like the rest of the index."""

    def __init__(self, levels: list[set[str]], chunks: int) -> None:
        self.levels = levels
        self.chunks = chunks

    def depth(self, replica: str) -> int:
        """Chunks of the prompt, from its start, that `replica` served."""
        return bisect.bisect_left(self.levels, True, key=lambda held: replica not in held)

    def deepest(self, among: Container[str]) -> tuple[int, list[str]]:
        """The longest match of any replica in `among`, and the replicas with it."""
        for depth in range(len(self.levels), 0, -1):
            found = [r for r in self.levels[depth - 1] if r in among]
            if found:
                return depth, found
        return 0, []


class PrefixIndex:
    def __init__(self, chunk_chars: int = 32, capacity: int = 8192) -> None:
        self.chunk_chars = chunk_chars
        self.capacity = capacity  # nodes per replica
        self.holders: dict[int, set[str]] = {}  # node -> replicas that served it
        self.recency: dict[str, OrderedDict[int, None]] = {}  # replica -> its nodes, LRU first

    def keys(self, text: str) -> list[int]:
        """The chained node names of the prefixes of `text`, root first."""
        out, h, n = [], 0, self.chunk_chars
        for i in range(0, len(text), n):
            h = hash((h, text[i : i + n]))
            out.append(h)
        return out

    def match(self, keys: list[int]) -> PrefixMatch:
        """The path of a prompt down the tree, as far as any replica served it."""
        levels = []
        for k in keys:
            holders = self.holders.get(k)
            if not holders:
                break
            levels.append(holders)
        return PrefixMatch(levels, len(keys))

    def insert(self, keys: list[int], replica: str) -> None:
        nodes = self.recency.setdefault(replica, OrderedDict())
        # Deepest first, so that the root end of the path is the most recently used and
        # eviction trims a prefix from its leaf.
        for k in reversed(keys):
            self.holders.setdefault(k, set()).add(replica)
            nodes[k] = None
            nodes.move_to_end(k)
        while len(nodes) > self.capacity:
            self._drop(nodes.popitem(last=False)[0], replica)

    def forget(self, replica: str) -> None:
        """Everything a replica served (it restarted, or left the fleet)."""
        for k in self.recency.pop(replica, {}):
            self._drop(k, replica)

    def size(self, replica: str) -> int:
        return len(self.recency.get(replica, ()))

    def _drop(self, key: int, replica: str) -> None:
        holders = self.holders[key]
        holders.discard(replica)
        if not holders:
            del self.holders[key]
