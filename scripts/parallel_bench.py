"""Tensor and pipeline parallelism against one rank, on the same cores: each rank's
bytes of weights and KV cache, the communication per decoded token (the bytes the
driver puts into its collectives, against the formulas), decode and prefill tokens/s
(the offline bench), and the pipeline's bubble measured as the driver stage's idle
share of a step.

  python scripts/parallel_bench.py [--model M] [--threads 2] [--batch 8] [--tg 64]
  python scripts/parallel_bench.py --allreduce-latency 2   # gloo's, between N processes

One configuration at a time, in this process (the driver) and the ranks it starts.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from llmopt.bench.offline import offline_bench
from llmopt.distributed import group
from llmopt.distributed.collectives import Collectives, ShmCollectives
from llmopt.distributed.pipeline import bubble
from llmopt.engine.footprint import weight_bytes
from llmopt.engine.llm import LLM
from llmopt.engine.sampling_params import SamplingParams

CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("1 rank", {}),
    ("TP=3", {"tensor_parallel_size": 3}),
    ("TP=3 Megatron", {"tensor_parallel_size": 3, "exact_tensor_parallel": False}),
    ("PP=2 m=1", {"pipeline_parallel_size": 2, "pipeline_microbatches": 1}),
    ("PP=2 m=2", {"pipeline_parallel_size": 2, "pipeline_microbatches": 2}),
    ("PP=2 m=4", {"pipeline_parallel_size": 2, "pipeline_microbatches": 4}),
]


@contextmanager
def counted(totals: dict[str, int]):
    """Count the payload bytes of the driver's collectives and sends by kind."""
    names = ("gather", "isend", "recv", "send")
    saved = {n: getattr(dist, n) for n in names}
    reduce, gather = Collectives.__call__, Collectives.gather  # shared memory or gloo

    def add(name: str, tensor: torch.Tensor) -> None:
        totals[name] = totals.get(name, 0) + tensor.numel() * tensor.element_size()

    def wrap(name):
        def call(tensor, *args, **kwargs):
            add(name, tensor)
            return saved[name](tensor, *args, **kwargs)

        return call

    def all_reduce(self, tensor):
        add("all_reduce", tensor)
        return reduce(self, tensor)

    def all_gather(self, tensor):  # this rank's part
        add("all_gather", tensor)
        return gather(self, tensor)

    for n in names:
        setattr(dist, n, wrap(n))
    Collectives.__call__, Collectives.gather = all_reduce, all_gather
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)
        Collectives.__call__, Collectives.gather = reduce, gather


@contextmanager
def stage_busy(model: torch.nn.Module, busy: list[float]):
    """Time the driver's own blocks (its stage's compute) into busy[0]."""
    blocks = model.blocks

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = blocks(*args, **kwargs)
        busy[0] += time.perf_counter() - t
        return out

    model.blocks = timed
    try:
        yield
    finally:
        del model.blocks


def measure(model: str, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    with LLM(
        model, threads=args.threads, max_num_seqs=args.batch, kv_cache_memory=0.2, **settings
    ) as llm:
        engine = llm.engine
        runner = engine.runner
        cache = runner.cache
        layers, slots = cache.k.shape[:2]
        out: dict[str, Any] = {
            "weights_MB_per_rank": weight_bytes(runner.model) / 1e6,
            "kv_bytes_per_token_per_rank": (cache.k.nbytes + cache.v.nbytes) // slots,
            "layers_per_rank": layers,
        }
        prompt = list(range(1000, 1016))
        params = SamplingParams(temperature=0, max_tokens=args.tg, ignore_eos=True)
        totals: dict[str, int] = {}
        llm.generate([prompt], params)  # warm-up
        with counted(totals):
            llm.generate([prompt], params)
        tokens = 16 + args.tg  # every position runs through every layer once
        out["comm_bytes_per_token"] = {k: v / tokens for k, v in totals.items()}
        busy = [0.0]
        prompts = [list(range(1000 + i, 1016 + i)) for i in range(args.batch)]
        with stage_busy(runner.model, busy):
            t = time.perf_counter()
            llm.generate(prompts, params)
            wall = time.perf_counter() - t
        out["driver_stage_idle_share"] = 1 - busy[0] / wall
        out |= offline_bench(engine, args.pp, args.tg, args.batch, args.repeats, seed=0).rates
    return out


def _allreduce_rank(rank: int, world: int, port: int, hidden: int, n: int) -> None:
    torch.set_num_threads(1)
    ranks = group.join(group.Rendezvous(rank, world, "127.0.0.1", port))
    shm = ShmCollectives.open(ranks)
    x = torch.randn(1, hidden)
    for name, reduce in (("gloo", dist.all_reduce), ("shared memory", shm)):
        for _ in range(50):
            reduce(x)
        t = time.perf_counter()
        for _ in range(n):
            reduce(x)
        if rank == 0:
            us = (time.perf_counter() - t) / n * 1e6
            print(f"{name} all-reduce of (1, {hidden}) fp32 over {world} processes: {us:.0f} us")
    group.leave()


def allreduce_latency(world: int, hidden: int = 576, n: int = 2000) -> None:
    """A decode step's all-reduce (one token's hidden state) between local processes."""
    import torch.multiprocessing as mp

    mp.spawn(_allreduce_rank, args=(world, group.free_port(), hidden, n), nprocs=world)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("--pp", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="Names of CONFIGS to run, comma-separated.")
    parser.add_argument("--allreduce-latency", type=int, metavar="N", help="Only that.")
    args = parser.parse_args()
    if args.allreduce_latency:
        allreduce_latency(args.allreduce_latency)
        return
    chosen = [c for c in CONFIGS if not args.only or c[0] in args.only.split(",")]
    results = {}
    for name, settings in chosen:
        results[name] = measure(args.model, settings, args)
        if "pipeline_parallel_size" in settings:
            stages, m = settings["pipeline_parallel_size"], settings["pipeline_microbatches"]
            results[name]["bubble_formula"] = bubble(stages, min(m, args.batch))
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
