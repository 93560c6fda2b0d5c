"""GGUF files as llama.cpp users run them: batch-1 decode against llama-bench tg128 on
the same files, and the memory a run holds.

    python scripts/bench_gguf_files.py FILE.gguf [FILE.gguf ...] \
        --llama-bench PATH/llama-bench [--rounds 2] [--threads 2] [--json OUT]

Per round and file (rounds alternate the files, so noise on this shared host spreads
over all of them):
- llama-bench: `-p 0 -n 128 -t T -r 3`, its mean tokens/s;
- llmopt: `llmopt bench FILE --offline --pp 16 --tg 128 --batch 1 --repeats 3`.

Memory, once per file, in a fresh process (`--memory-child`): the peak resident set of
loading the file and generating 64 tokens with a 20 MB KV cache, less the same
process's peak before loading (the interpreter, torch and llmopt's modules); then that
less the KV cache's bytes, against the file's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def llama_bench(binary: str, path: Path, threads: int) -> float:
    cmd = [binary, "-m", str(path), "-p", "0", "-n", "128", "-t", str(threads), "-r", "3"]
    out = subprocess.run(
        [*cmd, "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)[0]["avg_ts"])


def llmopt_decode(path: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "llmopt", "bench", str(path), "--offline", "--pp", "16"]
    cmd += ["--tg", "128", "--batch", "1", "--repeats", "3", "--threads", str(threads)]
    cmd.append("--json")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)["tg128_tokens_per_s"]["mean"])


def memory_child(path: Path, threads: int) -> None:
    """In this process: load, generate, print the peaks and the KV cache's bytes."""
    import torch

    from llmopt.engine.llm import LLM
    from llmopt.engine.sampling_params import SamplingParams

    torch.set_num_threads(threads)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    llm = LLM(str(path), kv_cache_memory=0.02)  # 20 MB: room for the run, no more
    # ignore_eos: all 64 tokens generated whatever the model's first choice (a base
    # model may end at once on a bare prompt)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    llm.generate(["Write a short story about a lighthouse."], params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kv = llm.engine.runner.cache.nbytes
    print(json.dumps({"before": before, "peak": peak, "kv": kv}))


def memory(path: Path, threads: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, str(path), "--memory-child", "--threads", str(threads)]
    got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    size = path.stat().st_size
    held = got["peak"] - got["before"]  # weights, KV cache and everything else the run made
    return {"file_mb": size / 1e6, "kv_mb": got["kv"] / 1e6, "held_mb": held / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--llama-bench")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.files[0], args.threads)
        return
    if not args.llama_bench:
        ap.error("--llama-bench is required")
    results: dict[str, dict] = {str(f): {"llama_bench": [], "llmopt": []} for f in args.files}
    for _ in range(args.rounds):
        for f in args.files:
            r = results[str(f)]
            r["llama_bench"].append(llama_bench(args.llama_bench, f, args.threads))
            r["llmopt"].append(llmopt_decode(f, args.threads))
            print(f.name, r["llama_bench"][-1], r["llmopt"][-1], file=sys.stderr)
    for f in args.files:
        results[str(f)]["memory"] = memory(f, args.threads)
    print("| file | llama-bench tg128 | llmopt | ratio | file MB | KV MB | held MB, less KV |")
    print("|---|---|---|---|---|---|---|")
    for f in args.files:
        r = results[str(f)]
        ratios = [a / b for a, b in zip(r["llmopt"], r["llama_bench"], strict=True)]
        m = r["memory"]
        held = m["held_mb"] - m["kv_mb"]
        print(
            f"| {f.name} | {' / '.join(f'{v:.1f}' for v in r['llama_bench'])} "
            f"| {' / '.join(f'{v:.1f}' for v in r['llmopt'])} "
            f"| {' / '.join(f'{v:.2f}x' for v in ratios)} | {m['file_mb']:.1f} | {m['kv_mb']:.1f} "
            f"| {m['held_mb']:.1f}, {held:.1f} ({held / m['file_mb']:.2f}x) |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
