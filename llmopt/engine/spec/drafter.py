"""The interface every drafter implements: propose up to k next tokens for a sequence.

A proposal may carry the draft's distribution at each proposed position; verification
then uses min(1, p/q) acceptance. Without one the proposal is deterministic (q is a
point mass on the proposed token), as for n-gram lookup.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from llmopt.engine.sequence import Sequence


@dataclass
class Draft:
    tokens: list[int]
    probs: torch.Tensor | None = None  # (len(tokens), V) the draft's distributions, or None


class Drafter(ABC):
    """Proposes continuations for running sequences. It never changes a sequence."""

    name: str = ""
    step_seconds: float = 0.0  # what drafting one token for the batch costs (0: nothing)

    @abstractmethod
    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        """One draft per sequence, of at most ks[i] tokens (0 asks for none)."""

    def release(self, request_id: str) -> None:  # noqa: B027 (most drafters keep nothing)
        """Forget a finished sequence's state (caches, indexes)."""
