"""Figures of a simulated run: percentiles of TTFT and end-to-end latency, throughput,
cold starts and prefix hits; the markdown table and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from llmopt.router.sim.replica import Job


class RunFigures(NamedTuple):
    policy: str
    load: float
    requests: int
    ttft_p50: float
    ttft_p99: float
    wait_p99: float  # TTFT less the request's own load and prefill: queueing
    e2e_p50: float
    e2e_p99: float
    tokens_per_s: float
    cold_starts: int
    prefix_hit_rate: float  # of requests with a shared prefix


def _pct(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


def figures(policy: str, load: float, jobs: list[Job]) -> RunFigures:
    ttft = sorted(j.first_token - j.request.arrival for j in jobs)
    e2e = sorted(j.end - j.request.arrival for j in jobs)
    wait = sorted(j.first_token - j.request.arrival - j.prefill_s for j in jobs)
    span = max(j.end for j in jobs) - min(j.request.arrival for j in jobs)
    shared = [j for j in jobs if j.request.prefix >= 0]
    return RunFigures(
        policy,
        load,
        len(jobs),
        _pct(ttft, 0.5),
        _pct(ttft, 0.99),
        _pct(wait, 0.99),
        _pct(e2e, 0.5),
        _pct(e2e, 0.99),
        sum(j.request.output_tokens for j in jobs) / span,
        sum(j.cold for j in jobs),
        sum(j.prefix_hit for j in shared) / max(1, len(shared)),
    )


def markdown(rows: list[RunFigures]) -> str:
    out = [
        "| load | policy | requests | TTFT P50 | TTFT P99 | queue P99 | E2E P50 | E2E P99 "
        "| tokens/s | cold starts | prefix hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.load:.0%} | {r.policy} | {r.requests:,} | {r.ttft_p50:.2f} s "
            f"| {r.ttft_p99:.2f} s | {r.wait_p99:.2f} s | {r.e2e_p50:.2f} s | {r.e2e_p99:.2f} s "
            f"| {r.tokens_per_s:,.0f} | {r.cold_starts:,} | {r.prefix_hit_rate:.0%} |"
        )
    return "\n".join(out)


def plot(rows: list[RunFigures], path: Path) -> bool:
    """P99 TTFT and cold starts against load, one line per policy; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy]
        loads = [r.load * 100 for r in mine]
        left.plot(loads, [r.ttft_p99 for r in mine], marker="o", label=policy)
        right.plot(loads, [r.cold_starts for r in mine], marker="o", label=policy)
    left.set(
        xlabel="load (%)", ylabel="P99 TTFT (s)", yscale="log", title="P99 time to first token"
    )
    right.set(xlabel="load (%)", ylabel="cold starts", yscale="symlog", title="Cold starts")
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
