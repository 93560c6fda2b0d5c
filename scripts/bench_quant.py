"""Batch-1 decode of quantized models: llmopt bf16 against llmopt int8 and int4
(weight-only, eager, the same engine and CLI path), and llama.cpp on the Q4_1 GGUF
the model ships as, alternated in one run.

The int8 and int4 checkpoints are made here by round-to-nearest: decode speed
depends on the layout (bits, group size), not on how the integers were chosen.

    python scripts/bench_quant.py [--tokens 128] [--threads 2] [--repeats 3]
        [--group-size 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from llmopt.bench.decode import kv_bytes_per_step, llama_cpp_decode, llmopt_decode, weight_bytes
from llmopt.bench.setup import bench_model, machine_info
from llmopt.loader.load import hf_folder_for, load_model
from llmopt.quant.pipeline import quantize_folder
from llmopt.quant.spec import QuantSpec

PROMPT = "Write a long story about a lighthouse keeper and a storm."
console = Console(stderr=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = machine_info(args.threads)
    store, gguf = bench_model(args.threads, console)
    folder = hf_folder_for(gguf, store, console)
    cpu = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="llmopt-bench-quant-"))
    paths = {"llmopt bf16": folder}
    variants = ((8, 0, True, False), (4, args.group_size, False, False))
    for bits, group, sym, head in (*variants, (4, args.group_size, False, True)):
        spec = QuantSpec(bits, "rtn", group, sym, lm_head=head)
        out = tmp / spec.label
        quantize_folder(folder, out, spec, "llmopt", "", 0, console)
        paths[f"llmopt {spec.label}"] = out
    models = {name: load_model(p, torch.bfloat16, cpu, store, console) for name, p in paths.items()}
    first = next(iter(models.values()))
    ids = first.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    prompt_text = first.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    kv = kv_bytes_per_step(first, len(ids) + args.tokens // 2, 4)
    runs: dict[str, list[float]] = {name: [] for name in [*models, "llama.cpp Q4_1"]}
    for _ in range(args.repeats):  # alternate, so that a noisy neighbour hits every engine
        for name, loaded in models.items():
            runs[name].append(llmopt_decode(loaded, ids, args.tokens))
        cpp = llama_cpp_decode(gguf, prompt_text, args.tokens, args.threads)
        if cpp is not None:
            runs["llama.cpp Q4_1"].append(cpp)
    per_token = {name: weight_bytes(m.model) + kv for name, m in models.items()}
    per_token["llama.cpp Q4_1"] = gguf.stat().st_size  # Q4_1 weights are nearly the file
    results = {
        name: {
            "tokens_per_s": round(statistics.median(r), 2),
            "min": round(min(r), 2),
            "max": round(max(r), 2),
            "GB_per_s": round(statistics.median(r) * per_token[name] / 1e9, 2),
            "bytes_per_token_MB": round(per_token[name] / 1e6, 1),
        }
        for name, r in runs.items()
        if r
    }
    bf16 = results["llmopt bf16"]["tokens_per_s"]
    ratios = {
        f"{name} / llmopt bf16": round(r["tokens_per_s"] / bf16, 2) for name, r in results.items()
    }
    summary = {**info, "decode_tokens": args.tokens, "results": results, "ratios": ratios}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"| engine | decode tok/s (median of {args.repeats}) | min-max | MB read/token | GB/s |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['tokens_per_s']} | {r['min']}-{r['max']} | "
            f"{r['bytes_per_token_MB']} | {r['GB_per_s']} |"
        )
    for k, v in ratios.items():
        print(f"{k}: {v}x")
    print(f"load average at start: {info['load_average_at_start']}; {info['machine']}")


if __name__ == "__main__":
    main()
