"""`llmopt bench MODEL --offline`: the in-process engine without HTTP, in the manner of
llama-bench: pp (prompt processing: a prompt of N random tokens, tokens/s of its
prefill) and tg (text generation: N tokens decoded one sequence at a time, tokens/s),
each repeated with mean and standard deviation; and batch throughput (the same
number of tokens for `batch` sequences at once).

Prompts are random token ids (seeded), EOS ignored, prefix cache off, so every
repetition does the same work.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

from llmopt.engine.engine import Engine
from llmopt.engine.sampling_params import SamplingParams


def _random_ids(engine: Engine, n: int, rng: random.Random) -> list[int]:
    vocab = engine.tokenizer.vocab_size
    return [rng.randrange(100, vocab) for _ in range(n)]  # skip the special tokens


def run_batch(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(seconds to the last prompt's first token, seconds in all) for one batch."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    while engine.has_unfinished():
        for rid in engine.step():
            first.setdefault(rid, time.perf_counter() - t0)
            engine.take(rid)
    return max(first[r] for r in ids), time.perf_counter() - t0


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def offline_bench(
    engine: Engine, pp: int, tg: int, batch: int, repeats: int, seed: int
) -> dict[str, Any]:
    engine.check_fits(pp, 1)
    engine.check_fits(16, tg)
    rng = random.Random(seed)
    run_batch(engine, [_random_ids(engine, 16, rng)], 4)  # warm-up: kernels, allocator
    pp_rates, tg_rates, batch_rates = [], [], []
    for _ in range(repeats):
        ttft, _ = run_batch(engine, [_random_ids(engine, pp, rng)], 1)
        pp_rates.append(pp / ttft)
        ttft, total = run_batch(engine, [_random_ids(engine, 16, rng)], tg)
        tg_rates.append((tg - 1) / (total - ttft))
        if batch > 1:
            _, total = run_batch(engine, [_random_ids(engine, 16, rng) for _ in range(batch)], tg)
            batch_rates.append(batch * tg / total)
    out: dict[str, Any] = {
        f"pp{pp}_tokens_per_s": _mean_std(pp_rates),
        f"tg{tg}_tokens_per_s": _mean_std(tg_rates),
        "repeats": repeats,
    }
    if batch > 1:
        out[f"batch{batch}_tg{tg}_tokens_per_s"] = _mean_std(batch_rates)
    return out
