"""Starting the ranks of a model split by tensor or pipeline parallelism.

On one machine llmopt starts the N - 1 worker processes itself, each running the same
`open_engine` under torchrun's environment variables (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so that a local launch and torchrun's across machines are one path. The
cores are shared out: each rank gets --threads / N torch threads (default: all of
torch's / N).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from rich.console import Console

from llmopt.distributed.group import DRIVER, Ranks, Rendezvous, free_port, from_env, join, leave
from llmopt.distributed.layers import parallelize
from llmopt.distributed.pipeline import PipelinePeers, serve_stage
from llmopt.distributed.shard import Shard
from llmopt.distributed.stage import Stage
from llmopt.distributed.steps import Peers
from llmopt.distributed.tensor import TensorPeers, serve_shard
from llmopt.engine.config import EngineConfig
from llmopt.errors import UsageError
from llmopt.loader.load import LoadedModel

WORKER = "llmopt.engine.worker"  # the module a started worker runs


def part_of(config: EngineConfig, rank: int) -> Shard | Stage:
    """Rank `rank`'s part of the model: its tensor-parallel shard or pipeline stage."""
    if config.tensor_parallel_size > 1:
        return Shard(rank, config.tensor_parallel_size, config.exact_tensor_parallel)
    return Stage(rank, config.pipeline_parallel_size)


def is_worker() -> bool:
    """Whether torchrun started this process as a rank other than the driver's: it
    runs its part of the model for the driver, and none of the command's own work."""
    where = from_env()
    return where is not None and where.rank != DRIVER


def open_ranks(config: EngineConfig) -> tuple[Ranks, EngineConfig, list[subprocess.Popen]]:
    """Join the model's ranks, starting the workers first where torchrun has not:
    this rank's place, the config it runs with (its share of the threads) and the
    worker processes it started."""
    n = config.ranks
    where = from_env()
    processes: list[subprocess.Popen] = []
    if where is None:
        threads = config.threads or torch.get_num_threads()
        config = config.replace(threads=max(1, threads // n))
        where = Rendezvous(DRIVER, n, "127.0.0.1", free_port())
        processes = [_start(config, dataclasses.replace(where, rank=r)) for r in range(1, n)]
    elif where.world != n:
        raise UsageError(
            f"torchrun started {where.world} ranks for a model split over {n}: "
            f"--nnodes x --nproc-per-node must be {n}"
        )
    try:
        ranks = join(where)
    except BaseException:
        _stop(processes)
        raise
    if processes:
        atexit.register(_stop, processes)
    return ranks, config, processes


def open_part(
    config: EngineConfig,
    load: Callable[[EngineConfig, Console | None, Shard | Stage], tuple[str, LoadedModel]],
    console: Console | None = None,
) -> tuple[str, LoadedModel, Peers]:
    """This process's part of a model split over config.ranks processes: on the driver
    (rank 0), its part and its peers. A worker rank serves the driver's steps here
    until it is told to stop, and then exits."""
    ranks, config, processes = open_ranks(config)
    try:
        part = part_of(config, ranks.rank)
        name, loaded = load(config, console, part)
        model = loaded.model
        if isinstance(part, Shard):
            parallelize(model, part, ranks)
        else:
            part.strip(model)
        if not ranks.is_driver:
            (serve_shard if isinstance(part, Shard) else serve_stage)(model, ranks)
            leave()
            raise SystemExit(0)
        peers: Peers = (
            TensorPeers(ranks, loaded.config.vocab_size, processes)
            if isinstance(part, Shard)
            else PipelinePeers(ranks, config.pipeline_microbatches or ranks.world, processes)
        )
    except BaseException:
        abandon(processes)
        raise
    atexit.register(peers.close)
    return name, loaded, peers


def abandon(processes: list[subprocess.Popen]) -> None:
    """Give up a launch that failed on this rank: stop what it started, leave the group."""
    _stop(processes)
    leave()


def _start(config: EngineConfig, where: Rendezvous) -> subprocess.Popen:
    env = {
        **os.environ,
        "RANK": str(where.rank),
        "LOCAL_RANK": str(where.rank),
        "WORLD_SIZE": str(where.world),
        "MASTER_ADDR": where.address,
        "MASTER_PORT": str(where.port),
    }
    settings = json.dumps(dataclasses.asdict(config))
    return subprocess.Popen([sys.executable, "-m", WORKER, settings], env=env)


def _stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()
