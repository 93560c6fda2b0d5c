"""Benchmark arithmetic: per-request timings to the summary a user deploys by.

Field names follow `vllm bench serve` (mean_ttft_ms, p99_itl_ms, output_throughput,
...) so that tooling written for it reads ours. Definitions:
- TTFT: request sent to first content chunk. ITL: gaps between chunks, pooled over
  requests. TPOT: per request, (e2e - ttft) / (output tokens - 1). E2EL: sent to last.
- output_throughput: output tokens / wall time of the run; per device: divided by
  the number of devices; per user: a request's output tokens / its e2e latency.
- goodput: requests per second that met every SLO given.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

from llmopt.bench.loadgen import RequestResult
from llmopt.errors import UsageError

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_METRICS = {"ttft", "tpot", "itl", "e2el"}


def percentile(xs: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def tpot(r: RequestResult) -> float | None:
    if r.ttft is None or r.output_tokens < 2:
        return None
    return (r.e2e - r.ttft) / (r.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    limits_ms: dict[str, float]  # metric -> most milliseconds allowed

    @classmethod
    def parse(cls, text: str) -> SLO:
        """'ttft=500,tpot=50' -> limits; names from ttft, tpot, itl, e2el."""
        limits = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip().lower()
            try:
                ms = float(value)
            except ValueError:
                ms = -1
            if name not in SLO_METRICS or ms <= 0:
                raise UsageError(
                    f"bad --slo '{part}': use NAME=MS with NAME one of "
                    f"{', '.join(sorted(SLO_METRICS))}, e.g. ttft=500,tpot=50"
                )
            limits[name] = ms
        return cls(limits)

    def met_by(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        values = {
            "ttft": r.ttft or 0.0,
            "tpot": tpot(r) or 0.0,
            "itl": max(r.itl, default=0.0),
            "e2el": r.e2e,
        }
        return all(values[k] * 1000 <= v for k, v in self.limits_ms.items())


def _stats(name: str, values_s: list[float], percentiles: tuple[float, ...]) -> dict:
    ms = [v * 1000 for v in values_s]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": statistics.median(ms) if ms else 0.0,
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = percentile(ms, p)
    return out


def summarize(
    results: list[RequestResult],
    duration_s: float,
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES,
    slo: SLO | None = None,
    num_devices: int = 1,
) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    per_user = [r.output_tokens / r.e2e for r in ok if r.e2e > 0]
    summary: dict = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "failure_reasons": dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": out_tokens / duration_s if duration_s else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s else 0.0,
        "output_throughput_per_device": out_tokens / duration_s / num_devices
        if duration_s
        else 0.0,
        "mean_output_throughput_per_user": statistics.fmean(per_user) if per_user else 0.0,
        "median_output_throughput_per_user": statistics.median(per_user) if per_user else 0.0,
    }
    summary |= _stats("ttft", [r.ttft for r in ok if r.ttft is not None], percentiles)
    summary |= _stats("tpot", [t for r in ok if (t := tpot(r)) is not None], percentiles)
    summary |= _stats("itl", [g for r in ok for g in r.itl], percentiles)
    summary |= _stats("e2el", [r.e2e for r in ok], percentiles)
    if slo is not None:
        good = sum(slo.met_by(r) for r in results)
        summary["request_goodput"] = good / duration_s if duration_s else 0.0
        summary["slo_met_fraction"] = good / len(results) if results else 0.0
    return summary
