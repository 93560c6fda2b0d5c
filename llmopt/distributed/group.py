"""The ranks of one model and the process groups they talk over.

Two groups over the same ranks:
- `steps` (gloo, a year's timeout): the driver's step descriptions, broadcast to the
  workers. A worker waits on it between requests, for as long as the server is idle;
  a driver that dies closes its sockets, which ends the wait at once.
- `compute` (gloo; COLLECTIVE_TIMEOUT_S): the collectives inside a step (the
  all-reduces and all-gathers of ranks on one host go through shared memory instead,
  collectives.py,
  under the same timeout). A rank that dies or stalls mid-step makes the others'
  collective fail within the timeout instead of hanging.

Ranks find each other by TCP (MASTER_ADDR:MASTER_PORT), as torchrun sets them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from llmopt.errors import UsageError

DRIVER = 0  # the rank that schedules, samples and talks to the user
COLLECTIVE_TIMEOUT_S = 60.0
IDLE_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    steps: dist.ProcessGroup
    compute: dist.ProcessGroup

    @property
    def is_driver(self) -> bool:
        return self.rank == DRIVER


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom a rank joins: torchrun's environment, or llmopt's own launch."""

    rank: int
    world: int
    address: str
    port: int


def from_env() -> Rendezvous | None:
    """torchrun's rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or None
    outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return Rendezvous(
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
        )
    except ValueError as e:
        raise UsageError(f"torchrun's environment is malformed: {e}") from None


def free_port() -> int:
    """A TCP port free on this machine now, for a local launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(where: Rendezvous, timeout_s: float | None = None) -> Ranks:
    """Join the model's ranks (blocks until all have joined, or the timeout: by
    default COLLECTIVE_TIMEOUT_S, which then bounds every collective of a step)."""
    timeout_s = COLLECTIVE_TIMEOUT_S if timeout_s is None else timeout_s
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{where.address}:{where.port}",
            rank=where.rank,
            world_size=where.world,
            timeout=timedelta(seconds=timeout_s),
        )
    except (RuntimeError, ValueError) as e:  # DistStoreError is a RuntimeError
        raise UsageError(
            f"rank {where.rank} of {where.world} could not reach the others at "
            f"{where.address}:{where.port} within {timeout_s:.0f} s: {e}"
        ) from None
    steps = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Ranks(where.rank, where.world, steps, dist.group.WORLD)  # type: ignore[arg-type]


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
