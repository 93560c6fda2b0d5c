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
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from llmopt.bench.setup import bench_model, machine_info
from llmopt.engine.llm import build_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.loader.load import LoadedModel, load_model

PROMPT = "Write a long story about a lighthouse keeper and a storm."
console = Console(stderr=True)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes read per decode step: every parameter once (a tied embedding counts once,
    as the lm_head; the embedding lookup itself reads one row)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_step(loaded: LoadedModel, context: int, kv_elem: int) -> int:
    c = loaded.config
    return 2 * c.num_layers * context * c.num_kv_heads * c.head_dim * kv_elem


def bench_llmopt(loaded: LoadedModel, ids: list[int], n: int) -> float:
    engine = build_engine(loaded, 4096, kv_cache_memory=0.5)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    *_, last = engine.generate(ids, params)
    assert last.stats is not None
    return last.stats.decode_tokens_per_s


def bench_transformers(folder: Path, ids: list[int], n: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    x = torch.tensor([ids])

    def timed(k: int) -> float:
        t = time.perf_counter()
        model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
        return time.perf_counter() - t

    timed(2)  # warm-up
    first, full = timed(1), timed(n)
    return (n - 1) / (full - first)


def bench_llama_cpp(gguf: Path, prompt: str, n: int, threads: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        console.print("llama-cpp-python is not installed: pip install -e '.[bench]'")
        return None
    llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=2048, verbose=False)
    eos = llm.token_eos()
    bias = {eos: -1e9}

    def timed(k: int) -> float:
        llm.reset()
        t = time.perf_counter()
        llm.create_completion(prompt, max_tokens=k, temperature=0, logit_bias=bias)
        return time.perf_counter() - t

    timed(2)
    first, full = timed(1), timed(n)
    return (n - 1) / (full - first)


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
        tps = statistics.median(runs)
        results[name] = {
            "tokens_per_s": round(tps, 2),
            "min": round(min(runs), 2),
            "max": round(max(runs), 2),
            "GB_per_s": round(tps * bytes_per_token / 1e9, 2),
        }
        console.print(f"{name}: {results[name]}")

    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        loaded = load_model(gguf, dtype, cpu, store, console)
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        avg_ctx = len(ids) + args.tokens // 2
        per_token = weight_bytes(loaded.model) + kv_bytes_per_step(loaded, avg_ctx, 4)
        runs = [bench_llmopt(loaded, ids, args.tokens) for _ in range(args.repeats)]
        record(f"llmopt {dtype_name}", runs, per_token)
        runs = [
            bench_transformers(loaded.folder, ids, args.tokens, dtype) for _ in range(args.repeats)
        ]
        record(f"transformers {dtype_name}", runs, weight_bytes(loaded.model))
    prompt_text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    cpp = [bench_llama_cpp(gguf, prompt_text, args.tokens, args.threads)]
    if cpp[0] is not None:
        cpp += [
            bench_llama_cpp(gguf, prompt_text, args.tokens, args.threads)
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
