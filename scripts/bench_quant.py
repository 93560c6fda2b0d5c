"""Batch-1 decode of quantized models: llmopt bf16 against llmopt int8 and int4
(weight-only, eager, the same engine and CLI path), and the Q4_1 GGUF the model ships
as, run by llmopt (its blocks as stored) and by llama.cpp, alternated in one run.

The int8 and int4 checkpoints are made here by round-to-nearest: decode speed
depends on the layout (bits, group size), not on how the integers were chosen; but a
GPTQ checkpoint with act-order also reorders each linear's inputs, so `--checkpoint
PATH` (repeatable) decodes checkpoints made by `llmopt quantize` in the same
alternation.

    python scripts/bench_quant.py [--tokens 128] [--threads 2] [--repeats 3]
        [--group-size 64] [--checkpoint PATH ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from llmopt.bench.decode import (
    kv_bytes_per_step,
    llama_cpp_decode,
    llmopt_decode,
    summarize_runs,
    weight_bytes,
)
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
    ap.add_argument("--checkpoint", type=Path, action="append", default=[])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    info = machine_info(args.threads)
    store, gguf = bench_model(args.threads, console)
    folder = hf_folder_for(gguf, store, console)
    cpu = torch.device("cpu")
    g = args.group_size
    specs = [
        QuantSpec(8, "rtn", 0, sym=True),
        QuantSpec(4, "rtn", g, sym=False),
        QuantSpec(4, "rtn", g, sym=False, head_bits=8),  # llama.cpp's Q4_1 file: Q8_0 head
        QuantSpec(4, "rtn", g, sym=False, head_bits=4),
    ]
    models = {
        "llmopt bf16": load_model(folder, torch.bfloat16, cpu, store, console),
        "llmopt Q4_1 file": load_model(gguf, torch.bfloat16, cpu, store, console),
    }
    with tempfile.TemporaryDirectory(prefix="llmopt-bench-quant-") as tmp:
        for spec in specs:  # loaded models keep no reference to their files
            out = Path(tmp) / spec.label
            quantize_folder(folder, out, spec, "llmopt", "", 0, console)
            models[f"llmopt {spec.label}"] = load_model(out, torch.bfloat16, cpu, store, console)
    for path in args.checkpoint:
        models[f"llmopt {path.name}"] = load_model(path, torch.bfloat16, cpu, store, console)
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
    results = {name: summarize_runs(r, per_token[name]) for name, r in runs.items() if r}
    bf16 = results["llmopt bf16"]["tokens_per_s"]
    ratios = {
        f"{name} / llmopt bf16": round(r["tokens_per_s"] / bf16, 2) for name, r in results.items()
    }
    if "llama.cpp Q4_1" in results:  # the Q4_1 file: the same weights, two engines
        cpp = results["llama.cpp Q4_1"]["tokens_per_s"]
        ratios |= {
            f"{name} / llama.cpp Q4_1": round(r["tokens_per_s"] / cpp, 2)
            for name, r in results.items()
            if name not in ("llmopt bf16", "llama.cpp Q4_1")
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
