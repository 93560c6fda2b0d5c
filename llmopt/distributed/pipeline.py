"""Pipeline parallelism's step: the batch, cut into micro-batches, flows through the
stages (stage.py), so that stage s works on micro-batch i while stage s + 1 works on
i - 1.

Between stages go two (N, hidden) tensors per micro-batch: the stage's last block's
output and the residual stream before it, which the next stage's first block adds with
its own fused norm, exactly as the block after it on one rank would: the output is
the one rank's, bit for bit. The last stage normalizes and sends the sampled rows'
hidden values to the driver (stage 0), which embeds, runs its blocks and projects
them onto the vocabulary (hidden values, not vocabulary-wide logits, cross the link).

With S stages and m micro-batches each stage idles for S - 1 of the m + S - 1 slots
of a step (the pipeline fills and drains every step, since the next step's tokens
depend on this step's logits): the bubble, (S - 1) / (m + S - 1).
"""

from __future__ import annotations

import subprocess

import torch
import torch.distributed as dist
from torch import nn

from llmopt.distributed.group import DRIVER, Ranks
from llmopt.distributed.stage import Stage
from llmopt.distributed.steps import Peers, Plan, serve, timeout


def bubble(stages: int, microbatches: int) -> float:
    """The share of a step each stage spends idle, with equal micro-batches."""
    return (stages - 1) / (microbatches + stages - 1)


class PipelinePeers(Peers):
    def __init__(
        self,
        ranks: Ranks,
        microbatches: int,
        processes: list[subprocess.Popen] | None = None,
    ) -> None:
        super().__init__(ranks, processes)
        self.microbatches = microbatches

    def forward(self, model: nn.Module, plans: list[Plan]) -> list[torch.Tensor | None]:
        self.send(("step", plans))
        last = self.ranks.world - 1
        try:
            # Every micro-batch's stream on its way before any logits are awaited.
            sent = [_send_on(model, inputs, self.ranks) for inputs, _ in plans]
            out: list[torch.Tensor | None] = []
            for _, rows in plans:
                if not rows:
                    out.append(None)
                    continue
                hidden = torch.empty(
                    len(rows), model.config.hidden_size, dtype=model.norm.weight.dtype
                )
                dist.recv(hidden, src=last, group=self.ranks.compute)
                out.append(model.logits(hidden))
            _wait(sent)
        except RuntimeError as e:
            raise self.lost(e) from None
        return out


def serve_stage(model: nn.Module, ranks: Ranks) -> None:
    """A pipeline stage's loop (a rank after the driver's stage 0)."""
    stage = Stage(ranks.rank, ranks.world)
    dtype = model.norm.weight.dtype  # the activations'

    def run(plans: list[Plan]) -> None:
        sent = []
        for inputs, rows in plans:
            shape = (2, inputs["input_ids"].shape[0], model.config.hidden_size)
            pair = torch.empty(shape, dtype=dtype)  # the previous stage's (x, residual)
            dist.recv(pair, src=ranks.rank - 1, group=ranks.compute)
            if not stage.last:
                sent.append(_send_on(model, inputs, ranks, pair))
                continue
            x, residual = model.blocks(pair[0], inputs["positions"], inputs["meta"], pair[1])
            if rows:  # the driver projects them: hidden values, not vocabulary-wide logits
                hidden = model.norm(x, residual)[rows].contiguous()
                dist.send(hidden, dst=DRIVER, group=ranks.compute)
        _wait(sent)

    serve(model, ranks, run)


def _send_on(
    model: nn.Module, inputs: dict, ranks: Ranks, pair: torch.Tensor | None = None
) -> tuple[dist.Work, torch.Tensor]:
    """Run this stage's blocks over a micro-batch (from its embeddings on the first
    stage, else from the previous stage's (x, residual) pair) and start sending their
    (x, residual) on to the next; the tensor is kept with the pending send."""
    positions, meta = inputs["positions"], inputs["meta"]
    if pair is None:
        x, residual = model.blocks(model.embed(inputs["input_ids"]), positions, meta)
    else:
        x, residual = model.blocks(pair[0], positions, meta, pair[1])
    out = torch.stack([x, residual])  # (2, N, hidden)
    return dist.isend(out, dst=ranks.rank + 1, group=ranks.compute), out


def _wait(sent: list[tuple[dist.Work, torch.Tensor]]) -> None:
    for work, _ in sent:
        work.wait(timeout())
