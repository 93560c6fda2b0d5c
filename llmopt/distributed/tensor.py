"""Tensor parallelism's step: every rank runs the whole batch through its shard (the
all-reduces are inside the model, layers.py) and computes the logits of its share of
the vocabulary, which the driver gathers."""

from __future__ import annotations

import subprocess

import torch
import torch.distributed as dist
from torch import nn

from llmopt.distributed.group import DRIVER, Ranks
from llmopt.distributed.steps import Peers, Plan, serve


class TensorPeers(Peers):
    def __init__(
        self, ranks: Ranks, vocab_size: int, processes: list[subprocess.Popen] | None = None
    ) -> None:
        super().__init__(ranks, processes)
        self.vocab_size = vocab_size

    def forward(self, model: nn.Module, plans: list[Plan]) -> list[torch.Tensor | None]:
        self.send(("step", plans))
        out: list[torch.Tensor | None] = []
        for inputs, rows in plans:
            try:  # the all-reduces inside the model, then the gather
                logits = _run(model, inputs, rows)
                out.append(None if logits is None else self._gather(logits))
            except RuntimeError as e:
                raise self.lost(e) from None
        return out

    def _gather(self, logits: torch.Tensor) -> torch.Tensor:
        """(M, V / ranks) the driver's share of the logits -> (M, vocab) all of them."""
        parts = [torch.empty_like(logits) for _ in range(self.ranks.world)]
        dist.gather(logits, parts, dst=DRIVER, group=self.ranks.compute)
        return torch.cat(parts, dim=1)[:, : self.vocab_size]


def serve_shard(model: nn.Module, ranks: Ranks) -> None:
    """A tensor-parallel worker rank's loop."""

    def run(plans: list[Plan]) -> None:
        for inputs, rows in plans:
            logits = _run(model, inputs, rows)
            if logits is not None:
                dist.gather(logits, None, dst=DRIVER, group=ranks.compute)

    serve(model, ranks, run)


def _run(model: nn.Module, inputs: dict, rows: list[int]) -> torch.Tensor | None:
    """This rank's logits of the sampled rows (its vocabulary share), or None."""
    hidden = model(**inputs)
    return model.logits(hidden[rows]).contiguous() if rows else None
