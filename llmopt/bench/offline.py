"""`llmopt bench MODEL --offline`: the in-process engine without HTTP, in the manner of
llama-bench: pp (prompt processing: a prompt of N random tokens, tokens/s of its
prefill) and tg (text generation: N tokens decoded one sequence at a time, tokens/s),
each repeated with mean and standard deviation; and batch throughput (the same
number of tokens for `batch` sequences at once).

With a depth (llama-bench's -d), tg and batch decode after a context of that many
tokens of each sequence's own, and the batch figure is its decode alone: the tokens of
the steps after every sequence has its context and first token, over their time (with
chunked prefill, early sequences decode while later ones still prefill).

Prompts are random token ids (seeded), EOS ignored, prefix cache off, so every
repetition does the same work.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, NamedTuple

from llmopt.engine.engine import Engine
from llmopt.engine.sampling_params import SamplingParams


def _random_ids(engine: Engine, n: int, rng: random.Random) -> list[int]:
    vocab = engine.tokenizer.vocab_size
    return [rng.randrange(100, vocab) for _ in range(n)]  # skip the special tokens


class BatchTimes(NamedTuple):
    ttft: float  # seconds to the last prompt's first token
    total: float  # seconds in all
    decoded: int  # tokens of the steps after every prompt had its first token


def run_batch(engine: Engine, prompts: list[list[int]], max_tokens: int) -> BatchTimes:
    """Run one batch to the end; its times."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    decoded = 0
    while engine.has_unfinished():
        started = len(first) == len(ids)
        out = engine.step()
        now = time.perf_counter() - t0
        decoded += len(out) if started else 0
        for rid in out:
            first.setdefault(rid, now)
            engine.take(rid)
    return BatchTimes(max(first[r] for r in ids), time.perf_counter() - t0, decoded)


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def offline_bench(
    engine: Engine, pp: int, tg: int, batch: int, repeats: int, seed: int, depth: int = 0
) -> dict[str, Any]:
    context = depth or 16  # each tg sequence's prompt
    engine.check_fits(pp, 1)
    engine.check_fits(context, tg)
    rng = random.Random(seed)
    run_batch(engine, [_random_ids(engine, 16, rng)], 4)  # warm-up: kernels, allocator
    pp_rates, tg_rates, batch_rates = [], [], []
    for _ in range(repeats):
        t = run_batch(engine, [_random_ids(engine, pp, rng)], 1)
        pp_rates.append(pp / t.ttft)
        t = run_batch(engine, [_random_ids(engine, context, rng)], tg)
        tg_rates.append((tg - 1) / (t.total - t.ttft))
        if batch > 1:
            t = run_batch(engine, [_random_ids(engine, context, rng) for _ in range(batch)], tg)
            # at depth, the decode alone; else the whole batch, as llama-bench's
            batch_rates.append(t.decoded / (t.total - t.ttft) if depth else batch * tg / t.total)
    at = f"_d{depth}" if depth else ""
    out: dict[str, Any] = {
        f"pp{pp}_tokens_per_s": _mean_std(pp_rates),
        f"tg{tg}{at}_tokens_per_s": _mean_std(tg_rates),
        "repeats": repeats,
    }
    if batch > 1:
        out[f"batch{batch}_tg{tg}{at}_tokens_per_s"] = _mean_std(batch_rates)
    return out
