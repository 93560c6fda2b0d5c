"""Batched generation throughput through `LLM.generate`, as a user runs it: N chat
prompts at once on the default model (or MODEL), `--tokens` each with EOS ignored,
tokens/s for each N. The prefix cache is on, as by default.

    python scripts/bench_batch.py [MODEL] [--sizes 1,4,8,16,32,64] [--tokens 128]
                                  [--threads 2] [--rounds 1] [--json]

Each size generates at least 512 tokens (one prompt runs four times at 128 tokens: a
single stream's figure is the noisiest). --rounds R measures every size R times,
alternated, a line per round with each size's ratio to batch 1.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmopt import LLM, SamplingParams
from llmopt.bench.setup import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--sizes", default="1,4,8,16,32,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(n) for n in args.sizes.split(",")]
    llm = LLM(args.model, kv_cache_memory=1.0, max_num_seqs=max(sizes))
    prompts = [f"Write a short story about topic number {i}." for i in range(max(sizes))]
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts[:2], warm, chat=True)  # kernels built, caches warm
    for _ in range(args.rounds):
        result: dict[str, float] = {}
        for n in sizes:
            runs = -(-512 // (n * args.tokens))  # at least 512 tokens
            t = time.perf_counter()
            for _ in range(runs):
                llm.generate(prompts[:n], params, chat=True)
            result[str(n)] = round(runs * n * args.tokens / (time.perf_counter() - t), 1)
        if "1" in result:
            ratios = {f"{n}/1": round(v / result["1"], 2) for n, v in result.items() if n != "1"}
            result = {**result, **ratios}
        out = {**machine_info(args.threads), "model": llm.name, "tokens_per_s": result}
        print(json.dumps(out, indent=2) if args.json else json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
