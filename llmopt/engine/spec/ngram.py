"""Prompt lookup: propose what followed the last occurrence of the sequence's current
suffix in its own prompt and output (Saxena 2023, "prompt lookup decoding").

Rewriting, summarising, editing and code changes copy long runs of their input; there
the tokens after an earlier match of the last n tokens are often the next ones. Each
sequence keeps an index from every n-gram (min_n <= n <= max_n) to where its most
recent occurrence ends, extended incrementally as tokens arrive, so a proposal costs
a few dict lookups however long the context is. The longest matching n wins: a long
match is a copy in progress (sizes 2 to 12 were chosen on texts the benchmark does not
use; BENCHMARKS.md, "Speculative decoding").
"""

from __future__ import annotations

from llmopt.engine.sequence import Sequence
from llmopt.engine.spec.drafter import Draft, Drafter


class _Index:
    def __init__(self) -> None:
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> end of its latest occurrence
        self.done = 0  # occurrences ending before this position are indexed


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 12) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, not {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _Index] = {}

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft(self._lookup(s, k) if k else []) for s, k in zip(seqs, ks, strict=True)]

    def release(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.token_ids
        end = len(tokens)
        index = self._index.setdefault(seq.request_id, _Index())
        # Index occurrences ending before the current end: the suffix itself (ending at
        # `end`) must not match itself.
        for e in range(max(index.done, self.min_n), end):
            for n in range(self.min_n, min(self.max_n, e) + 1):
                index.ends[tuple(tokens[e - n : e])] = e
        index.done = max(index.done, end)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            start = index.ends.get(tuple(tokens[end - n :]))
            if start is None:
                continue
            out: list[int] = []
            for j in range(k):
                # A match that runs into the present repeats itself: a period of end - start.
                i = start + j
                out.append(tokens[i] if i < end else out[i - end])
            return out
        return []
