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
repetition does the same work. Where speculative decoding ran, its acceptance rate and
mean accepted length are reported over every measured request: from the summed
counts, so that each drafted token (and each round) weighs the same.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any, NamedTuple

from llmopt.engine.engine import Engine
from llmopt.engine.outputs import RequestStats
from llmopt.engine.sampling_params import SamplingParams


def random_ids(engine: Engine, n: int, rng: random.Random) -> list[int]:
    vocab = engine.tokenizer.vocab_size
    return [rng.randrange(100, vocab) for _ in range(n)]  # skip the special tokens


class BatchTimes(NamedTuple):
    ttft: float  # seconds to the last prompt's first token
    total: float  # seconds in all
    decoded: int  # tokens of the steps after every prompt had its first token
    stats: list[RequestStats]  # each request's, as it finished


def run_batch(engine: Engine, prompts: list[list[int]], max_tokens: int) -> BatchTimes:
    """Run one batch to the end; its times."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first: dict[str, float] = {}
    stats: list[RequestStats] = []
    decoded = 0
    while engine.has_unfinished():
        started = len(first) == len(ids)
        out = engine.step()
        now = time.perf_counter() - t0
        for rid in out:
            first.setdefault(rid, now)
            deltas = engine.take(rid)
            # Tokens, not sequences: a verified speculative round gives several.
            decoded += sum(len(d.token_ids) for d in deltas) if started else 0
            stats += [d.stats for d in deltas if d.stats is not None]
    return BatchTimes(max(first[r] for r in ids), time.perf_counter() - t0, decoded, stats)


def spec_totals(stats: list[RequestStats]) -> RequestStats:
    """Speculative decoding's counts summed over requests (the rest left at zero)."""
    return RequestStats(
        spec_rounds=sum(s.spec_rounds for s in stats),
        spec_draft_tokens=sum(s.spec_draft_tokens for s in stats),
        spec_accepted_tokens=sum(s.spec_accepted_tokens for s in stats),
    )


def _mean_std(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


class OfflineResult(NamedTuple):
    rates: dict[str, Any]  # each test's tokens/s (mean, std), and the repeats
    spec: RequestStats  # speculative decoding's counts over the measured requests


def offline_bench(
    engine: Engine, pp: int, tg: int, batch: int, repeats: int, seed: int, depth: int = 0
) -> OfflineResult:
    context = depth or 16  # each tg sequence's prompt
    engine.check_fits(pp, 1)
    engine.check_fits(context, tg)
    rng = random.Random(seed)
    run_batch(engine, [random_ids(engine, 16, rng)], 4)  # warm-up: kernels, allocator
    pp_rates, tg_rates, batch_rates = [], [], []
    finished: list[RequestStats] = []  # the measured tg and batch requests
    for _ in range(repeats):
        t = run_batch(engine, [random_ids(engine, pp, rng)], 1)
        pp_rates.append(pp / t.ttft)
        t = run_batch(engine, [random_ids(engine, context, rng)], tg)
        tg_rates.append((tg - 1) / (t.total - t.ttft))
        finished += t.stats
        if batch > 1:
            t = run_batch(engine, [random_ids(engine, context, rng) for _ in range(batch)], tg)
            # at depth, the decode alone; else the whole batch, as llama-bench's
            batch_rates.append(t.decoded / (t.total - t.ttft) if depth else batch * tg / t.total)
            finished += t.stats
    at = f"_d{depth}" if depth else ""
    out: dict[str, Any] = {
        f"pp{pp}_tokens_per_s": _mean_std(pp_rates),
        f"tg{tg}{at}_tokens_per_s": _mean_std(tg_rates),
        "repeats": repeats,
    }
    if batch > 1:
        out[f"batch{batch}_tg{tg}{at}_tokens_per_s"] = _mean_std(batch_rates)
    return OfflineResult(out, spec_totals(finished))
