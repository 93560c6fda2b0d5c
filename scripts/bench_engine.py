"""Continuous-batching engine measurements on SmolLM2-135M (issue 3), in one run:

1. offline: 64 prompts batched against the same prompts one at a time, same engine;
2. batching policies: static, dynamic, continuous on Poisson arrivals with mixed
   output lengths (throughput, P50/P99 time to first token);
3. prefix cache: 16 requests sharing a 1,000-token system prompt, cache on and off;
4. KV memory: tokens stored against blocks allocated, at the busiest step.

    python scripts/bench_engine.py [--threads 2] [--dtype bfloat16] [--only offline,policies,prefix]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from rich.console import Console

from llmopt.bench.setup import bench_model, machine_info
from llmopt.engine.config import EngineConfig
from llmopt.engine.engine import Engine
from llmopt.engine.factory import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import LoadedModel, load_model

console = Console(stderr=True)
TOPICS = [
    "the sea",
    "a city at night",
    "bread",
    "chess",
    "volcanoes",
    "a library",
    "winter",
    "bicycles",
    "the moon",
    "coffee",
    "bees",
    "trains",
    "rain",
    "music",
    "mountains",
    "a garden",
]


def chat_ids(loaded: LoadedModel, text: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    return loaded.tokenizer.encode_chat(msgs)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def drive(engine: Engine, arrivals: list[tuple[float, list[int], SamplingParams]]) -> dict:
    """Feed requests at their arrival times (seconds from now), step until all finish."""
    start = time.perf_counter()
    pending = sorted(arrivals, key=lambda a: a[0])
    ids, stats, peak = [], [], {"tokens": 0, "blocks": 0, "seqs": 0}
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            _, prompt, params = pending.pop(0)
            ids.append(engine.add_request(prompt, params))
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        for rid in engine.step():
            for d in engine.take(rid):
                if d.stats is not None:
                    stats.append(d.stats)
        running = engine.scheduler.running
        if len(running) > peak["seqs"]:
            peak = {
                "tokens": sum(s.num_computed_tokens for s in running),
                "blocks": sum(len(s.block_table) for s in running),
                "seqs": len(running),
            }
    wall = time.perf_counter() - start
    out_tokens = sum(s.completion_tokens for s in stats)
    ttft = [s.ttft_s * 1000 for s in stats]
    return {
        "requests": len(stats),
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(out_tokens / wall, 2),
        "p50_ttft_ms": round(pct(ttft, 50), 1),
        "p99_ttft_ms": round(pct(ttft, 99), 1),
        "peak": peak,
    }


def offline(loaded: LoadedModel, n: int, tokens: int) -> dict:
    prompts = [
        chat_ids(loaded, f"Write a short poem about {TOPICS[i % len(TOPICS)]}.") for i in range(n)
    ]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    config = EngineConfig(max_context=2048, kv_cache_memory=1.0, prefix_cache=False, max_num_seqs=n)
    engine = build_engine(loaded, config)
    batched = drive(engine, [(0.0, p, params) for p in prompts])
    t = time.perf_counter()
    for p in prompts:
        for _ in engine.generate(p, params):
            pass
    serial_tps = n * tokens / (time.perf_counter() - t)
    kv_block = engine.blocks.block_size
    peak = batched["peak"]
    return {
        "prompts": n,
        "output_tokens_each": tokens,
        "batched_tokens_per_s": batched["output_tokens_per_s"],
        "one_at_a_time_tokens_per_s": round(serial_tps, 2),
        "speedup": round(batched["output_tokens_per_s"] / serial_tps, 2),
        "kv_at_busiest_step": {
            "sequences": peak["seqs"],
            "tokens_stored": peak["tokens"],
            "slots_allocated": peak["blocks"] * kv_block,
            "waste_slots_per_sequence": round(
                (peak["blocks"] * kv_block - peak["tokens"]) / max(peak["seqs"], 1), 2
            ),
            "block_size": kv_block,
        },
    }


def policies(loaded: LoadedModel, n: int, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        params = SamplingParams(temperature=0, max_tokens=rng.randint(8, 96), ignore_eos=True)
        arrivals.append((t, chat_ids(loaded, f"Tell me about {TOPICS[i % len(TOPICS)]}."), params))
    out = {}
    for policy in ("static", "dynamic", "continuous"):
        cfg = EngineConfig(
            max_context=2048, kv_cache_memory=1.0, max_num_seqs=8, batching=policy, max_wait_s=2.0
        )
        engine = build_engine(loaded, cfg)
        out[policy] = drive(engine, arrivals)
        out[policy].pop("peak")
        console.print(f"{policy}: {out[policy]}")
    return out


def prefix(loaded: LoadedModel, n: int, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    system = " ".join(
        f"Rule {i}: be precise, cite sources, and keep answers short." for i in range(1, 80)
    )
    prompts = [
        chat_ids(loaded, f"Tell me about {TOPICS[i % len(TOPICS)]}.", system) for i in range(n)
    ]
    t, arrivals = 0.0, []
    for p in prompts:
        t += rng.expovariate(rate)
        arrivals.append((t, p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)))
    out = {"system_prompt_tokens": len(chat_ids(loaded, "", system)), "requests": n}
    for name, on in (("prefix_cache_off", False), ("prefix_cache_on", True)):
        engine = build_engine(
            loaded, EngineConfig(max_context=2048, kv_cache_memory=1.0, prefix_cache=on)
        )
        res = drive(engine, arrivals)
        res.pop("peak")
        res["hit_rate"] = round(engine.blocks.hit_rate, 3)
        out[name] = res
        console.print(f"{name}: {res}")
    off, on_ = out["prefix_cache_off"]["p50_ttft_ms"], out["prefix_cache_on"]["p50_ttft_ms"]
    out["p50_ttft_ratio_off_over_on"] = round(off / on_, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--only", default="offline,policies,prefix")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    result: dict = machine_info(args.threads)
    store, gguf = bench_model(args.threads, console)
    loaded = load_model(gguf, getattr(torch, args.dtype), torch.device("cpu"), store, console)
    result["dtype"] = args.dtype
    only = set(args.only.split(","))
    if "offline" in only:
        result["offline"] = offline(loaded, 64, 32)
        console.print(f"offline: {result['offline']}")
    if "policies" in only:
        result["policies"] = policies(loaded, 32, 2.0, args.seed)
    if "prefix" in only:
        result["prefix"] = prefix(loaded, 16, 1.0, args.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
