"""Showing and saving benchmark results: a rich table on the terminal (stderr when
machine-readable output goes to stdout), JSON and CSV, written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmopt.atomic import atomic_file

# (label, key, unit) rows of the terminal table; percentile rows are added per run
HEADLINE = [
    ("completed / failed", None, ""),
    ("request throughput", "request_throughput", "req/s"),
    ("output throughput", "output_throughput", "tok/s"),
    ("total token throughput", "total_token_throughput", "tok/s"),
    ("output tok/s per device", "output_throughput_per_device", "tok/s"),
    ("output tok/s per user (median)", "median_output_throughput_per_user", "tok/s"),
]
LATENCIES = [
    ("time to first token", "ttft"),
    ("time per output token", "tpot"),
    ("inter-token latency", "itl"),
    ("end-to-end latency", "e2el"),
]


def _fmt(v: Any) -> str:
    return f"{v:,.2f}" if isinstance(v, float) else str(v)


def table(runs: list[tuple[str, dict[str, Any]]], percentiles: tuple[float, ...]) -> Table:
    """One column per run (a configuration, a concurrency level, ...)."""
    t = Table(show_header=True, header_style="bold")
    t.add_column("metric")
    for name, _ in runs:
        t.add_column(name, justify="right")
    for label, key, unit in HEADLINE:
        if key is None:
            t.add_row(label, *(f"{r['completed']} / {r['failed']}" for _, r in runs))
        else:
            t.add_row(f"{label} ({unit})", *(_fmt(r.get(key, "")) for _, r in runs))
    for label, m in LATENCIES:
        # median is p50; the JSON keeps both names, as vllm bench serve does
        for stat in ["mean", "median", *(f"p{p:g}" for p in percentiles if p != 50)]:
            key = f"{stat}_{m}_ms"
            t.add_row(f"{label} {stat} (ms)", *(_fmt(r.get(key, "")) for _, r in runs))
    extras = sorted(
        {k for _, r in runs for k in r if k.startswith(("server_", "request_good", "slo_"))}
    )
    for key in extras:
        t.add_row(key, *(_fmt(r.get(key, "")) for _, r in runs))
    return t


def failures(runs: list[tuple[str, dict[str, Any]]], console: Console) -> None:
    for name, r in runs:
        for reason, count in r.get("failure_reasons", {}).items():
            console.print(f"[red]{name}: {count} failed: {reason}[/red]", highlight=False)


def to_json(runs: list[tuple[str, dict[str, Any]]]) -> str:
    if len(runs) == 1:
        return json.dumps(runs[0][1], indent=2)
    return json.dumps([{"name": n} | r for n, r in runs], indent=2)


def to_csv(runs: list[tuple[str, dict[str, Any]]]) -> str:
    keys = ["name", *sorted({k for _, r in runs for k, v in r.items() if not isinstance(v, dict)})]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for name, r in runs:
        w.writerow({"name": name} | r)
    return buf.getvalue()


def write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        Path(tmp).write_text(text)
