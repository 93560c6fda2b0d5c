"""Speculative decoding against plain decoding, batch 1, through `LLM.generate`.

Each workload runs its configurations in one process, alternating them prompt by
prompt (the machine's load drifts; alternation spreads it over both), after one
warm-up request each. Reported per configuration: tokens/s over whole requests
(prefill included, as a user waits for it) and decode tokens/s (after the first
token), acceptance rate and mean accepted length
(summed counts), and at temperature 0 whether every output equals the plain one.

  extractive  temperature 0, rewrite / edit / summarise a supplied text of about 500
              tokens (a code edit among them): off against --speculative ngram
  chat        temperature 0, chat questions: the bf16 model (the GGUF dequantized)
              alone against it drafted by its own packed Q4_1 file (--draft)
  creative    temperature 0.8, stories and poems: off against ngram (adaptive
              speculation must switch itself off)
  rows        what a decode step of one sequence costs by its rows (a verification)

  python scripts/bench_speculative.py extractive --threads 2 --json out.json
  python scripts/bench_speculative.py --write-chat-dataset chat.jsonl  # for llmopt bench
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmopt.engine.llm import Completion
from llmopt.engine.outputs import RequestStats
from llmopt.engine.sequence import Sequence
from llmopt.engine.spec.drafter import Draft, Drafter
from llmopt.store.resolve import resolve
from llmopt.store.store import Store

MODEL = "smollm2-135m-instruct"

CHAT = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis simply.",
    "How do I boil an egg?",
    "What causes rain?",
    "Write a short email asking my manager for a day off on Friday.",
    "What is a prime number? Give examples.",
    "Why is the sky blue?",
    "How does a bicycle stay upright?",
    "What is machine learning, in two sentences?",
    "What should I pack for a weekend hiking trip?",
    "Explain the difference between weather and climate.",
    "How do vaccines work?",
    "Give me a simple recipe for pancakes.",
    "What are the planets of the solar system?",
    "How can I improve my handwriting?",
]
CREATIVE = [
    "Write a short story about a dragon who is afraid of the dark.",
    "Write a poem about the sea at night.",
    "Invent a new holiday and describe how people celebrate it.",
    "Write a fairy tale about a clockmaker and a talking cat.",
    "Describe an alien city as a travel guide would.",
    "Write a short story that begins with a knock on the door.",
    "Write a song about a lighthouse keeper.",
    "Write a diary entry of a pirate who lost his ship.",
]


def extractive_prompts() -> list[str]:
    """Tasks over texts the model did not see in tuning: reference prose (pydoc_data)
    and standard-library code, about 500 tokens each."""
    from pydoc_data.topics import topics

    def prose(name: str) -> str:
        return " ".join(topics[name].split())[:2000]

    code = textwrap.dedent(inspect.getsource(textwrap.TextWrapper._wrap_chunks))[:2000]
    return [
        "Rewrite the following text, fixing any typos and changing nothing else:\n\n"
        + prose("while"),
        "Copy the following text, replacing the word 'statement' with 'instruction' "
        "everywhere:\n\n" + prose("if"),
        "Rename the variable `chunks` to `pieces` in this Python code and output the "
        "whole function:\n\n" + code,
        "Summarise the following text in a few sentences, quoting its key sentences:\n\n"
        + prose("try"),
        "Rewrite the following text in plain English, keeping every example:\n\n" + prose("with"),
        "Reformat the following text as a bulleted list, keeping its wording:\n\n" + prose("for"),
    ]


# (name, LLM settings) per workload: the first is the baseline.
CONFIGS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "extractive": [("off", {}), ("ngram", {"speculative": "ngram"})],
    "chat": [
        ("bf16", {"dequantize": True, "dtype": "bfloat16"}),
        ("bf16 + Q4_1 draft", {"dequantize": True, "dtype": "bfloat16", "draft": MODEL}),
    ],
    "creative": [("off", {}), ("ngram", {"speculative": "ngram"})],
}


class LlamaServer:
    """llama.cpp's server on the same GGUF file, answering like `LLM.generate`: the
    peer, with and without its own speculation (--spec-type)."""

    def __init__(self, binary: Path, gguf: Path, threads: int, port: int, spec: list[str]):
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        args = [str(binary), "-m", str(gguf), "-t", str(threads), "-c", "4096", "--port",
                str(port), "-np", "1", *spec]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{binary} did not start")

    def generate(self, prompt: str, params: Any, chat: bool) -> list[Completion]:
        import httpx

        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "seed": params.seed,
        }
        r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=600).json()
        t = r["timings"]
        n = t["predicted_n"]
        # Its generation time spread over the tokens after the first, as llmopt's stats
        # count decode time.
        itl = [t["predicted_ms"] / 1000 / n] * (n - 1)
        stats = RequestStats(completion_tokens=n, itl_s=itl)
        if t.get("draft_n"):  # it reports no rounds: no mean accepted length
            stats.spec_draft_tokens = t["draft_n"]
            stats.spec_accepted_tokens = t["draft_n_accepted"]
        text = r["choices"][0]["message"]["content"]
        return [Completion(text, [], "", stats)]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


# llama-server's own speculation on the same file: none, and prompt lookup.
PEER_CONFIGS = [
    ("llama.cpp off", ["--spec-type", "none"]),
    ("llama.cpp ngram-simple", ["--spec-type", "ngram-simple", "--spec-draft-n-max", "8"]),
]


def run(
    workload: str, threads: int, max_tokens: int, seed: int, llama_server: Path | None
) -> dict[str, Any]:
    from llmopt import LLM, SamplingParams

    prompts = {"extractive": extractive_prompts(), "chat": CHAT, "creative": CREATIVE}[workload]
    temperature = 0.8 if workload == "creative" else 0.0
    llms: list[tuple[str, Any]] = [
        (name, LLM(MODEL, max_num_seqs=1, threads=threads, **kw)) for name, kw in CONFIGS[workload]
    ]
    if llama_server is not None:
        gguf = resolve(MODEL, Store(), Console(stderr=True))[1]
        for i, (name, spec) in enumerate(PEER_CONFIGS):
            llms.append((name, LlamaServer(llama_server, gguf, threads, 8190 + i, spec)))
    totals = {
        name: {"tokens": 0, "seconds": 0.0, "rounds": 0, "drafted": 0, "accepted": 0,
               "decode_tokens": 0, "decode_s": 0.0}
        for name, _ in llms
    }  # fmt: skip
    outputs: dict[str, list[str]] = {name: [] for name, _ in llms}
    warm = SamplingParams(temperature=0, max_tokens=16)
    for _, llm in llms:
        llm.generate(prompts[0], warm, chat=True)
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i)
        for name, llm in llms:
            start = time.perf_counter()
            out = llm.generate(prompt, params, chat=True)[0]
            t = totals[name]
            t["seconds"] += time.perf_counter() - start
            t["tokens"] += out.stats.completion_tokens
            t["decode_tokens"] += len(out.stats.itl_s)  # after the first token
            t["decode_s"] += sum(out.stats.itl_s)
            t["rounds"] += out.stats.spec_rounds
            t["drafted"] += out.stats.spec_draft_tokens
            t["accepted"] += out.stats.spec_accepted_tokens
            outputs[name].append(out.text)
    base = llms[0][0]
    result: dict[str, Any] = {
        "workload": workload,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "threads": threads,
        "load_average": os.getloadavg(),
        "configs": {},
    }
    for name, _ in llms:
        t = totals[name]
        b = totals[base]
        rate, base_rate = t["tokens"] / t["seconds"], b["tokens"] / b["seconds"]
        decode, base_decode = t["decode_tokens"] / t["decode_s"], b["decode_tokens"] / b["decode_s"]
        result["configs"][name] = {
            "tokens": t["tokens"],
            "tokens_per_s": round(rate, 1),
            "vs_baseline": round(rate / base_rate, 3),
            "decode_tokens_per_s": round(decode, 1),
            "decode_vs_baseline": round(decode / base_decode, 3),
            "acceptance_rate": round(t["accepted"] / t["drafted"], 3) if t["drafted"] else None,
            "mean_accepted_length": round(1 + t["accepted"] / t["rounds"], 2)
            if t["rounds"]
            else None,
            "same_output_as_baseline": sum(
                a == b for a, b in zip(outputs[name], outputs[base], strict=True)
            ),
        }
    for _, llm in llms:
        if isinstance(llm, LlamaServer):
            llm.close()
    return result


class _Fixed(Drafter):
    """Proposes k copies of one token: steps of exactly k + 1 rows."""

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[Draft]:
        return [Draft([100] * k) for k in ks]


def step_times(threads: int, rows: list[int]) -> dict[str, Any]:
    """Median time of a decode step of one sequence by its rows (a verification of
    rows - 1 drafts), over a short context."""
    from llmopt import LLM, SamplingParams
    from llmopt.engine.spec.adaptive import SpecController

    llm = LLM(MODEL, max_num_seqs=1, threads=threads)
    engine, execute = llm.engine, llm.engine.runner.execute
    times: dict[int, list[float]] = {}

    def timed(step: Any) -> Any:
        start = time.perf_counter()
        out = execute(step)
        if all(step.decode_rows()):  # decode and verification rows only
            times.setdefault(step.total_tokens, []).append(time.perf_counter() - start)
        return out

    engine.runner.execute = timed
    prompt = llm.encode("Tell me a long story about a cat.", chat=True)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for r in rows * 2:
        engine.drafter = _Fixed() if r > 1 else None
        engine.spec = SpecController(r - 1, adaptive=False) if r > 1 else None
        llm.generate([prompt], params)
    return {
        "threads": threads,
        "load_average": os.getloadavg(),
        "median_ms": {r: round(1000 * sorted(t)[len(t) // 2], 2) for r, t in sorted(times.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workload", nargs="?", choices=[*sorted(CONFIGS), "rows"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="Write the result here too.")
    ap.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server: the peer.")
    ap.add_argument("--write-chat-dataset", type=Path, help="JSONL of CHAT for llmopt bench.")
    args = ap.parse_args()
    if args.write_chat_dataset:
        lines = [json.dumps({"messages": [{"role": "user", "content": q}]}) for q in CHAT]
        args.write_chat_dataset.write_text("\n".join(lines) + "\n")
        return
    if args.workload is None:
        ap.error("name a workload, or --write-chat-dataset")
    torch.set_num_threads(args.threads)
    if args.workload == "rows":
        print(json.dumps(step_times(args.threads, [1, 2, 4, 5, 8, 9, 10, 13, 16]), indent=1))
        return
    result = run(args.workload, args.threads, args.max_tokens, args.seed, args.llama_server)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
