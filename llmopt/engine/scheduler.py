"""Continuous batching: at every step, decide which sequences run and how many of
their tokens, within a token budget. It sees sequences and the block manager, never
tensors; the runner executes what it decides.

Policy (continuous, the default): first come, first served. Running sequences go
first (each decode is one token; a prompt still being prefilled gets a chunk of what
budget remains, so a long prompt never stalls the decodes), then waiting ones are
admitted while the budget,
the sequence limit and the KV blocks allow. When a running sequence cannot get a
block, the most recently admitted one is preempted: its blocks are freed and it
waits at the front of the queue to be recomputed (its full blocks are likely still
in the prefix cache).

For comparison the same scheduler also batches the old ways, running each batch to
completion before admitting more: "dynamic" takes whatever has arrived (up to
max_num_seqs); "static" waits until max_num_seqs requests are queued, or the oldest
has waited max_wait_s.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from llmopt.engine.block_manager import BlockManager
from llmopt.engine.config import EngineConfig
from llmopt.engine.sequence import Sequence, SequenceStatus


@dataclass
class Step:
    """One step's work: for each sequence, how many of its uncomputed tokens to run."""

    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def split(self, parts: int) -> list[Step]:
        """At most `parts` steps of consecutive sequences, about equal in tokens: a
        pipeline's micro-batches (each sequence whole in one)."""
        parts = min(parts, len(self.seqs))
        if parts <= 1:
            return [self]
        share = self.total_tokens / parts
        out, done = [Step()], 0
        for seq, n in zip(self.seqs, self.num_tokens, strict=True):
            if out[-1].seqs and done >= share * len(out) and len(out) < parts:
                out.append(Step())
            out[-1].add(seq, n)
            done += n
        return out

    def decode_rows(self) -> list[bool]:
        """Per sequence: does it run one query row a token of its own kind: a decode
        (one token), or a verification (its last token and its drafts)."""
        return [1 + len(s.draft_ids) == n for s, n in zip(self.seqs, self.num_tokens, strict=True)]


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.num_tokens + 1) > self.blocks.num_blocks:
            raise ValueError(
                f"request {seq.request_id} needs more KV blocks than the cache has "
                f"({self.blocks.num_blocks} of {self.blocks.block_size} tokens)"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        step = Step()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_uncomputed_tokens + len(seq.draft_ids), budget)
            if seq.draft_ids:
                del seq.draft_ids[n - 1 :]  # what the budget leaves room to verify
                if not self.blocks.reserve(seq, n):  # drafts never preempt anyone
                    seq.draft_ids.clear()
                    n = 1
            if not self._reserve_or_preempt(seq, n, step):
                continue
            step.add(seq, n)
            budget -= n
        continuous = self.config.batching == "continuous"
        if not continuous and (self.running or not self._batch_ready()):
            return step  # run the current batch to completion first
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            if continuous and budget == 0:
                break
            seq = self.waiting[0]
            if self._prefix_in_flight(seq):
                break  # admitted next step or so, as a cache hit (first come, first served)
            if not self.blocks.allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            # A batch admitted whole may exceed this step's budget; the rest of its
            # prompts run in the next steps.
            n = min(seq.num_uncomputed_tokens, budget)
            if n:
                step.add(seq, n)
                budget -= n
        return step

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Is a running sequence computing the next block of seq's prompt that the cache
        lacks? Then seq waits for it rather than compute it again: 16 requests that
        arrive together with one 1,000-token system prompt prefill it once, not 16 times."""
        if not self.blocks.prefix_cache or not self.running:
            return False
        end = self.blocks.cached_prefix_tokens(seq) + self.blocks.block_size
        if end > seq.num_tokens - 1:  # no full block left to share (the last token runs)
            return False
        prefix = seq.token_ids[:end]
        return any(
            r.num_computed_tokens < end <= r.num_tokens and r.token_ids[:end] == prefix
            for r in self.running
        )

    def _batch_ready(self) -> bool:
        if self.config.batching == "dynamic" or not self.waiting:
            return True
        waited = time.monotonic() - self.waiting[0].arrival_time
        return len(self.waiting) >= self.config.max_num_seqs or waited >= self.config.max_wait_s

    def _reserve_or_preempt(self, seq: Sequence, n: int, step: Step) -> bool:
        """Room for seq's next n tokens, preempting the latest admitted sequences as
        needed; False if seq itself was preempted."""
        while not self.blocks.reserve(seq, n):
            victim = self.running[-1]
            self._preempt(victim)
            step.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        seq.draft_ids.clear()
        self.blocks.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def computed(self, step: Step) -> None:
        """Record that the runner ran the step's tokens. A verified sequence's drafts
        count only as they are accepted (`accept_draft`)."""
        for seq, n in zip(step.seqs, step.num_tokens, strict=True):
            seq.num_computed_tokens += n - len(seq.draft_ids)
            self.blocks.register_full_blocks(seq)
            self.blocks.release_behind_window(seq)

    def accept_draft(self, seq: Sequence) -> None:
        """seq's last appended token was an accepted draft: its keys are in the cache."""
        seq.num_computed_tokens += 1
        self.blocks.register_full_blocks(seq)

    def verified(self, seq: Sequence) -> None:
        """seq's drafts are judged: free the blocks that only rejected ones used."""
        seq.draft_ids.clear()
        if seq.status is SequenceStatus.RUNNING:
            self.blocks.trim(seq)

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (EOS, stop, length): free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.draft_ids.clear()
        seq.status = SequenceStatus.FINISHED

    def abort(self, request_id: str) -> bool:
        for seq in [*self.running, *self.waiting]:
            if seq.request_id == request_id:
                self.finish(seq)
                return True
        return False
