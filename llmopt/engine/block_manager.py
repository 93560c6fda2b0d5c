"""Paged KV cache bookkeeping: fixed-size blocks, reference counts and a global prefix
cache. It sees token ids and block ids, never tensors.

Prefix cache: a full block is identified by a hash chained over (parent block's hash,
the block's token ids), so equal hashes mean equal whole prefixes. Any sequence whose
prompt starts with a cached prefix shares those blocks. Blocks no sequence references
stay cached until their space is needed, then are evicted least recently used first.
A shared block is never written: a prefix match always leaves the block of the
prompt's last token to the sequence itself (see _match_prefix), so no block is copied.

Sliding windows: where every layer sees only its last `window` keys (Mistral), a
sequence's blocks that fall wholly behind the window are given back as it goes, so
that a long generation holds about window / block_size blocks rather than one per 16
tokens of its length. Where some layer sees every key (Gemma 3's global layers), no
block is ever behind every window, and none is released early.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from llmopt.engine.sequence import Sequence

HOLE = -1  # a block_table entry given back (behind every layer's window)


def block_hash(parent: int | None, tokens: list[int]) -> int:
    # Hashes of tuples of ints do not depend on PYTHONHASHSEED.
    return hash((parent, tuple(tokens)))


@dataclass
class Block:
    id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and registered in the cache


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        prefix_cache: bool = True,
        window: int | None = None,  # the most keys any layer reads (None: all of them)
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))  # unreferenced, not cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, cached; LRU first
        self.cached: dict[int, int] = {}  # hash -> block id
        self.hit_tokens = 0
        self.miss_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached but unreferenced)."""
        return len(self.free_ids) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation -------------------------------------------------------------------

    def _take(self) -> int:
        if self.free_ids:
            bid = self.free_ids.popleft()
        else:
            bid, _ = self.evictable.popitem(last=False)  # least recently used
            block = self.blocks[bid]
            del self.cached[block.hash]  # type: ignore[arg-type]
            block.hash = None
        self.blocks[bid].ref_count = 1
        return bid

    def _ref(self, bid: int) -> None:
        self.evictable.pop(bid, None)
        self.blocks[bid].ref_count += 1

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """How many of seq's leading tokens the prefix cache holds now."""
        return len(self._match_prefix(seq)) * self.block_size

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold the longest prefix of seq's tokens. The last token
        is left out so that at least one token is computed (it yields the logits)."""
        matched, parent = [], None
        if not self.prefix_cache:
            return matched
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            bid = self.cached.get(h)
            if bid is None:
                break
            matched.append(bid)
            parent = h
        return matched

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.
        Returns False, changing nothing, when there is not enough free space."""
        assert not seq.block_table, "sequence already holds blocks"
        matched = self._match_prefix(seq)
        new = self.blocks_for(seq.num_tokens) - len(matched)
        # Matched blocks that sit in the evictable pool stop being available.
        available = self.num_free_blocks - sum(1 for b in matched if b in self.evictable)
        if new > available:
            return False
        for bid in matched:
            self._ref(bid)
        seq.block_hashes = [self.blocks[b].hash for b in matched]  # type: ignore[misc]
        seq.block_table = matched + [self._take() for _ in range(new)]
        seq.num_cached_tokens = seq.num_computed_tokens = len(matched) * self.block_size
        self.hit_tokens += seq.num_cached_tokens
        self.miss_tokens += seq.num_tokens - seq.num_cached_tokens
        return True

    def reserve(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next `num_new_tokens` tokens of a running sequence; False,
        changing nothing, when there are not enough free blocks."""
        extra = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if extra > self.num_free_blocks:
            return False
        seq.block_table += [self._take() for _ in range(max(extra, 0))]
        return True

    # -- after a step -----------------------------------------------------------------

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the sequence's newly completed blocks into the prefix cache."""
        if not self.prefix_cache:
            return
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = block_hash(parent, seq.token_ids[i * bs : (i + 1) * bs])
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.hash is None:
                block.hash = h
                self.cached[h] = block.id

    def release_behind_window(self, seq: Sequence) -> None:
        """Give back seq's blocks that no layer will read again: its next position,
        num_computed_tokens, reads keys from num_computed_tokens + 1 - window on (and
        a computed position is never recomputed but after a preemption, which starts
        over). Call after register_full_blocks: a registered block stays in the prefix
        cache, evictable, for the requests that share it."""
        if self.window is None:
            return
        behind = max(0, seq.num_computed_tokens + 1 - self.window) // self.block_size
        for i in range(seq.released_blocks, min(behind, len(seq.block_table))):
            self._release(seq.block_table[i])
            seq.block_table[i] = HOLE
            seq.released_blocks = i + 1

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks at once (finished, aborted or preempted)."""
        # Reverse order: a prefix's tail is evicted before its head, which more
        # requests are likely to share.
        for bid in reversed(seq.block_table[seq.released_blocks :]):
            self._release(bid)
        seq.block_table = []
        seq.block_hashes = []
        seq.released_blocks = 0
        seq.num_computed_tokens = 0

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past those the sequence's tokens fill (reserved for drafts
        that were rejected). They hold no accepted token, so none is in the prefix cache."""
        keep = self.blocks_for(seq.num_tokens)
        for bid in reversed(seq.block_table[keep:]):
            self._release(bid)
        del seq.block_table[keep:]

    def _release(self, bid: int) -> None:
        block = self.blocks[bid]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {bid} freed twice"
        if block.ref_count == 0:
            if block.hash is None:
                self.free_ids.append(bid)
            else:
                self.evictable[bid] = None

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0
