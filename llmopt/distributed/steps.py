"""How the driver hands each step to the other ranks, and a worker rank's loop.

The driver schedules and prepares each step as it does alone (engine/runner.py): a
plan per (micro-)batch, its model inputs (token ids, positions, the attention
metadata: the same block tables on every rank, each rank's cache holding its own part
of the same blocks) and the rows it samples. It broadcasts the plans to the workers;
then tensor parallelism (tensor.py) or the pipeline (pipeline.py) runs them, and the
driver gets the sampled rows' logits back.

Messages are pickled on the driver and unpickled on the workers: the ranks of one
model trust each other, as torch.distributed's own object collectives do.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmopt.distributed import group
from llmopt.distributed.group import DRIVER, Ranks, leave
from llmopt.errors import LlmoptError
from llmopt.layers.kv_cache import PagedKVCache

# One (micro-)batch: the model's keyword inputs and the rows whose logits are sampled.
Plan = tuple[dict[str, Any], list[int]]


class WorkerLost(LlmoptError):
    """A rank of the model stopped answering: the model cannot run without it."""


@dataclass(frozen=True)
class CacheSpec:
    num_blocks: int
    block_size: int
    kv_types: tuple[str, str]


class Peers:
    """The driver's handle on the worker ranks (and on the worker processes it started,
    if it started them)."""

    microbatches = 1  # plans a step is cut into

    def __init__(self, ranks: Ranks, processes: list[subprocess.Popen] | None = None) -> None:
        self.ranks = ranks
        self.processes = processes or []
        self.closed = False
        self.broken = False  # a collective failed: the group cannot be used again

    def bind(self, spec: CacheSpec) -> None:
        """Have every worker build its cache: the same blocks as the driver's."""
        self.send(("cache", spec))

    def forward(self, model: nn.Module, plans: list[Plan]) -> list[torch.Tensor | None]:
        """Run a step's plans on every rank; each plan's logits (rows, vocab), in fp32,
        or None where it samples no row."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop the workers (they leave their loops and exit) and leave the group; after
        a lost rank, stop the workers this process started without a word (a broken
        group's broadcast could wait out its timeout)."""
        if self.closed:
            return
        self.closed = True
        if not self.broken:
            with contextlib.suppress(WorkerLost):
                self.send(("stop",))
        for p in self.processes:
            try:
                p.wait(timeout=0 if self.broken else 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        leave()

    def send(self, message: tuple) -> None:
        """Broadcast a message, bounded by the collectives' timeout (the steps group's
        own is the workers' idle wait)."""
        data = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        try:
            for t in (torch.tensor([data.numel()]), data):
                dist.broadcast(t, src=DRIVER, group=self.ranks.steps, async_op=True).wait(timeout())
        except RuntimeError as e:
            raise self.lost(e) from None

    def lost(self, e: Exception) -> WorkerLost:
        """The error that a failed collective means: which worker is gone, and how."""
        self.broken = True
        codes = [(i, p.poll()) for i, p in enumerate(self.processes, start=1)]
        dead = [f"rank {i} (exit code {code})" for i, code in codes if code is not None]
        which = ", ".join(dead) if dead else "a worker rank"
        # gloo's message: "[file:line] What happened. Advice ..."
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0] if str(e) else "")
        first = first.split(". ")[0] or type(e).__name__
        if "timed out" in first.lower():
            first = f"no answer within {group.COLLECTIVE_TIMEOUT_S:.0f} s"
        return WorkerLost(f"the model's {which} was lost: {first}")


def timeout() -> timedelta:
    return timedelta(seconds=group.COLLECTIVE_TIMEOUT_S)


def serve(model: nn.Module, ranks: Ranks, run: Callable[[list[Plan]], None]) -> None:
    """A worker rank's loop: build the cache the driver asks for and `run` each step's
    plans, until the driver says stop (or is gone)."""
    p = model.norm.weight
    while True:
        try:
            message = _receive(ranks.steps)
        except RuntimeError:
            return  # the driver is gone: nothing left to serve
        if message[0] == "stop":
            return
        if message[0] == "cache":
            spec: CacheSpec = message[1]
            cache = PagedKVCache.for_model(
                model.config, spec.num_blocks, spec.block_size, p.dtype, p.device, spec.kv_types
            )
            model.bind_cache(cache)
            continue
        try:
            with torch.inference_mode():
                run(message[1])
        except RuntimeError as e:  # a peer is gone mid-step (the driver reports which)
            print(f"llmopt: rank {ranks.rank} stops: {e}".splitlines()[0], file=sys.stderr)
            return


def _receive(steps: dist.ProcessGroup) -> tuple:
    """A worker's side of Peers.send: the message's size, then its pickled bytes."""
    size = torch.empty(1, dtype=torch.int64)
    dist.broadcast(size, src=DRIVER, group=steps)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=DRIVER, group=steps)
    return pickle.loads(data.numpy().tobytes())
