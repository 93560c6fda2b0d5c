"""Single-stream decode: llmopt against transformers `generate` and llama-cpp-python,
same model, same thread count, one run.

Decode speed is timed apart from the prompt: (N - 1) tokens over the time from the
first generated token to the last. Achieved bandwidth is the bytes of weights (and
KV cache) each decode step reads, times steps per second.

    python scripts/bench_decode.py [--tokens 128] [--threads 2] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from llmopt.bench.decode import (
    kv_bytes_per_step,
    llama_cpp_decode,
    llmopt_decode,
    summarize_runs,
    transformers_decode,
    weight_bytes,
)
from llmopt.bench.setup import bench_model, machine_info
from llmopt.loader.load import load_model

PROMPT = "Write a long story about a lighthouse keeper and a storm."
console = Console(stderr=True)


def startup_seconds(model: Path) -> float:
    """Wall time of a fresh `llmopt run MODEL PROMPT --max-tokens 1` (imports + load)."""
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "llmopt", "run", str(model), "Hi", "--max-tokens", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = machine_info(args.threads)
    store, gguf = bench_model(args.threads, console)
    cpu = torch.device("cpu")
    results: dict[str, dict[str, float]] = {}

    def record(name: str, runs: list[float], bytes_per_token: float) -> None:
        results[name] = summarize_runs(runs, bytes_per_token)
        console.print(f"{name}: {results[name]}")

    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = load_model(gguf, dtype, cpu, store, console)
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        avg_ctx = len(ids) + args.tokens // 2
        per_token = weight_bytes(loaded.model) + kv_bytes_per_step(loaded, avg_ctx, 4)
        runs = [llmopt_decode(loaded, ids, args.tokens) for _ in range(args.repeats)]
        record(f"llmopt {dtype_name}", runs, per_token)
        runs = [
            transformers_decode(loaded.folder, ids, args.tokens, dtype) for _ in range(args.repeats)
        ]
        record(f"transformers {dtype_name}", runs, weight_bytes(loaded.model))
    prompt_text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    cpp = [llama_cpp_decode(gguf, prompt_text, args.tokens, args.threads)]
    if cpp[0] is None:
        console.print("llama-cpp-python is not installed: pip install -e '.[bench]'")
    else:
        cpp += [
            llama_cpp_decode(gguf, prompt_text, args.tokens, args.threads)
            for _ in range(args.repeats - 1)
        ]
        # Q4_1 weights are nearly the whole file.
        record("llama-cpp-python Q4_1", [c for c in cpp if c is not None], gguf.stat().st_size)
    start = startup_seconds(gguf)
    summary = {
        **info,
        "decode_tokens": args.tokens,
        "results": results,
        "llmopt_bf16_vs_transformers_bf16": round(
            results["llmopt bf16"]["tokens_per_s"] / results["transformers bf16"]["tokens_per_s"], 2
        ),
        "startup_s_run_max_tokens_1": round(start, 2),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"| engine | decode tok/s (median of {args.repeats}) | min-max | weights+KV GB/s |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']} | {r['min']}-{r['max']} | {r['GB_per_s']} |")
    print(f"\nllmopt bf16 / transformers bf16: {summary['llmopt_bf16_vs_transformers_bf16']}x")
    print(
        f"start-up (fresh process, run --max-tokens 1): {summary['startup_s_run_max_tokens_1']} s"
    )
    print(f"load average at start: {info['load_average_at_start']}; {info['machine']}")


if __name__ == "__main__":
    main()
