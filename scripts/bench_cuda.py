"""SmolLM2-135M on a CUDA GPU: llmopt's engine against transformers `generate`, same
weights, same dtype, one run.

1. single-stream decode: (N - 1) tokens over the time from the first generated token
   to the last (the prompt excluded), median of the repeats;
2. batch throughput: B chat prompts, N tokens each (EOS ignored), every request
   submitted at once: generated tokens over the wall time, prompt processing included.
   transformers gets the same prompts left-padded into one `generate` call.

    python scripts/bench_cuda.py [--tokens 128] [--batches 16,64] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console

from llmopt.bench.decode import (
    llmopt_decode,
    summarize_runs,
    sync,
    transformers_decode,
    weight_bytes,
)
from llmopt.bench.offline import run_batch
from llmopt.bench.setup import bench_model, machine_info
from llmopt.engine.config import EngineConfig
from llmopt.engine.factory import build_engine
from llmopt.loader.load import LoadedModel, load_model

PROMPT = "Write a long story about a lighthouse keeper and a storm."
TOPICS = ["the sea", "a city at night", "bread", "chess", "volcanoes", "a library", "winter"]
console = Console(stderr=True)


def chat_ids(loaded: LoadedModel, text: str) -> list[int]:
    return loaded.tokenizer.encode_chat([{"role": "user", "content": text}])


def prompts_for(loaded: LoadedModel, batch: int) -> list[list[int]]:
    return [
        chat_ids(loaded, f"Write a short poem about {TOPICS[i % len(TOPICS)]}, number {i}.")
        for i in range(batch)
    ]


def llmopt_batch(loaded: LoadedModel, prompts: list[list[int]], n: int) -> float:
    """Generated tokens/s for all prompts submitted at once (prefix cache off)."""
    config = EngineConfig(
        max_context=2048,
        kv_cache_memory=4.0,
        max_num_seqs=len(prompts),
        max_num_batched_tokens=4096,
        prefix_cache=False,
    )
    engine = build_engine(loaded, config)
    total = run_batch(engine, prompts, n).total
    return len(prompts) * n / total


def transformers_batch(model, prompts: list[list[int]], n: int, pad_id: int) -> float:
    """The same prompts left-padded into one greedy `generate` call."""
    longest = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    t = time.perf_counter()
    model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
        pad_token_id=pad_id,
    )  # fmt: skip
    sync(device)
    return len(prompts) * n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    from transformers import AutoModelForCausalLM

    cuda = torch.device("cuda")
    store, gguf = bench_model(torch.get_num_threads(), console)
    dtype = getattr(torch, args.dtype)
    loaded = load_model(gguf, dtype, cuda, store, console)  # the GGUF dequantized, dense
    ids = chat_ids(loaded, PROMPT)
    results: dict[str, dict] = {}

    def record(name: str, runs: list[float], bytes_per_token: float = 0.0) -> None:
        results[name] = summarize_runs(runs, bytes_per_token)
        console.print(f"{name}: {results[name]}")

    weights = weight_bytes(loaded.model)
    llmopt_decode(loaded, ids, 8)  # warm-up: kernels, allocator
    record("llmopt decode", [llmopt_decode(loaded, ids, args.tokens) for _ in range(args.repeats)],
           weights)  # fmt: skip
    runs = [
        transformers_decode(loaded.folder, ids, args.tokens, dtype, "cuda")
        for _ in range(args.repeats)
    ]
    record("transformers decode", runs, weights)
    ref = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=dtype).to(cuda).eval()
    pad = min(loaded.eos_ids, default=0)
    for b in (int(x) for x in args.batches.split(",")):
        prompts = prompts_for(loaded, b)
        llmopt_batch(loaded, prompts[:4], 8)  # warm-up at this batch's shapes
        record(f"llmopt batch {b}", [llmopt_batch(loaded, prompts, args.tokens)
                                     for _ in range(args.repeats)])  # fmt: skip
        transformers_batch(ref, prompts[:4], 8, pad)
        record(f"transformers batch {b}", [transformers_batch(ref, prompts, args.tokens, pad)
                                           for _ in range(args.repeats)])  # fmt: skip
    ratios = {
        name.removeprefix("llmopt "): round(
            r["tokens_per_s"] / results[name.replace("llmopt", "transformers")]["tokens_per_s"], 2
        )
        for name, r in results.items()
        if name.startswith("llmopt")
    }
    summary = {
        **machine_info(torch.get_num_threads(), cuda),
        "dtype": args.dtype,
        "tokens": args.tokens,
        "results": results,
        "llmopt_over_transformers": ratios,
        "median_ratio": round(statistics.median(ratios.values()), 2),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"| test | llmopt tok/s | transformers tok/s | ratio |  ({summary.get('gpu')})")
    print("|---|---|---|---|")
    for key, ratio in ratios.items():
        ours, theirs = results[f"llmopt {key}"], results[f"transformers {key}"]
        print(f"| {key} | {ours['tokens_per_s']} | {theirs['tokens_per_s']} | {ratio}x |")


if __name__ == "__main__":
    main()
