"""Batch-1 decode of several models alternated in one process: each one's tokens/s and
its ratio to the first model's, round by round.

On a shared machine the speed drifts by tens of percent within a minute, so models
timed one after another (`llmopt bench` per model) compare badly. Here every model is
loaded once, and each round runs one greedy 128-token request on each, the order
rotated every round so that none always runs first or right after another. The
ratios are taken within a round, and their median is the figure to quote.

    python scripts/decode_ab.py BASE OTHER [OTHER ...] [--rounds 45] [--tokens 128]
        [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

from rich.console import Console

from llmopt.bench.offline import random_ids, run_batch
from llmopt.bench.setup import machine_info
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine, load

PROMPT_TOKENS = 16
console = Console(stderr=True)


def rotated(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def decode_rate(engine: Engine, rng: random.Random, tokens: int) -> float:
    """Tokens/s of one request's decode (after its first token), random prompt."""
    t = run_batch(engine, [random_ids(engine, PROMPT_TOKENS, rng)], tokens)
    return (tokens - 1) / (t.total - t.ttft)  # as offline_bench's tg rate


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("models", nargs="+", help="registry names, checkpoints or GGUF files")
    ap.add_argument("--rounds", type=int, default=45)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if len(args.models) < 2 or args.rounds < 1 or args.tokens < 2:
        ap.error("give two models or more, --rounds >= 1 and --tokens >= 2")
    machine = machine_info(args.threads)  # the load before this run's own
    engines: dict[str, Engine] = {}
    for name in args.models:
        cfg = EngineConfig(model=name, threads=args.threads, kv_cache_memory=0.5)
        engines[name] = build_engine(load(cfg, console).model, cfg, console)
    rng = random.Random(0)
    for engine in engines.values():  # warm up: first-call allocations, caches
        decode_rate(engine, rng, 4)
    rates: dict[str, list[float]] = {name: [] for name in args.models}
    for r in range(args.rounds):
        for name in rotated(args.models, r):
            rates[name].append(decode_rate(engines[name], rng, args.tokens))
    base = rates[args.models[0]]
    results = {}
    for name, xs in rates.items():
        ratios = [x / b for x, b in zip(xs, base, strict=True)]
        results[name] = {
            "median_tokens_per_s": statistics.median(xs),
            "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    report = {"machine": machine, "rounds": args.rounds,
              "tokens": args.tokens, "results": results}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, res in results.items():
        console.print(
            f"{name}: median {res['median_tokens_per_s']:.1f} tokens/s, "
            f"{res['ratio_median']:.3f}x the first (rounds {res['ratio_min']:.3f}-"
            f"{res['ratio_max']:.3f})",
            highlight=False,
        )


if __name__ == "__main__":
    main()
