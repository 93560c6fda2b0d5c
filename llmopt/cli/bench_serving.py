"""`llmopt bench`'s serving benchmark: a workload sent to any OpenAI-compatible server
(--url) or to local `llmopt serve` processes started for the run, with side-by-side
comparisons of engine configurations and sweeps. Exit code 1 when an --slo is missed.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import typer
from rich.console import Console

from llmopt.bench.workloads import (
    Conversation,
    chat_file_workload,
    multi_turn_workload,
    random_workload,
    shared_prefix_workload,
)
from llmopt.errors import UsageError


@dataclass(frozen=True)
class ServingOptions:
    url: str | None
    served_model: str | None
    api_key: str | None
    workload: str
    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float
    num_prefixes: int
    prefix_len: int
    dataset: Path | None
    turns: int
    concurrency: int | None
    request_rate: float | None
    duration: float | None
    warmup: int
    warm_prefixes: bool
    seed: int
    timeout: float
    percentiles: str
    slo: str | None
    slo_target: float
    num_devices: int
    compare: str | None
    sweep: str | None
    serve_arg: list[str] | None
    as_json: bool
    as_csv: bool
    output: Path | None
    plot: Path | None


WORKLOADS = ("random", "shared-prefix", "chat", "multi-turn")
# The optimization stack: each configuration adds one layer to the one before.
STACK = [
    ("static batching", ["--batching", "static", "--no-prefix-cache"]),
    ("+ continuous batching", ["--batching", "continuous", "--no-prefix-cache"]),
    ("+ prefix cache", ["--batching", "continuous", "--prefix-cache"]),
    (
        "+ speculative (ngram)",
        ["--batching", "continuous", "--prefix-cache", "--speculative", "ngram"],
    ),
]
COMPARE_AXES = {
    "batching": lambda v: ["--batching", v],
    "prefix-cache": lambda v: [
        "--prefix-cache" if v in ("on", "true", "1") else "--no-prefix-cache"
    ],
    "dtype": lambda v: ["--dtype", v],
    "weights": lambda v: ["--dequantize"] if v == "dense" else [],  # or "gguf": as stored
    "max-num-seqs": lambda v: ["--max-num-seqs", v],
    "kv-cache-dtype": lambda v: ["--kv-cache-dtype", v],
    "speculative": lambda v: ["--speculative", v],  # off or ngram
}


def _configs(compare: str | None) -> list[tuple[str, list[str]]]:
    if compare is None:
        return [("llmopt", [])]
    if compare == "stack":
        return STACK
    key, _, values = compare.partition("=")
    if key not in COMPARE_AXES or not values:
        raise UsageError(
            f"bad --compare '{compare}': use 'stack' or KEY=V1,V2 with KEY one of "
            f"{', '.join(COMPARE_AXES)}"
        )
    return [(f"{key}={v}", COMPARE_AXES[key](v)) for v in values.split(",")]


def _with_prefixes(measured: list[Conversation], pool: list[Conversation]) -> list[Conversation]:
    """One warm-up request per distinct system prompt of `measured`: the pool's own
    questions under those system prompts, so that only the shared prefixes are cached."""
    systems = list(dict.fromkeys(c.system for c in measured if c.system))
    return [replace(c, system=s) for c, s in zip(pool, systems, strict=False)]


def _sweep(sweep: str | None) -> list[tuple[str, float]]:
    if sweep is None:
        return []
    key, _, values = sweep.partition("=")
    try:
        points = [float(v) for v in values.split(",")]
    except ValueError:
        points = []
    if key not in ("concurrency", "request-rate") or not points or min(points) <= 0:
        raise UsageError(f"bad --sweep '{sweep}': use concurrency=1,2,4 or request-rate=1,2,4")
    return [(key, p) for p in points]


def _workload(
    kind: str,
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    num_prefixes: int,
    prefix_len: int,
    dataset: Path | None,
    turns: int,
    seed: int,
) -> list[Conversation]:
    if kind == "random":
        return random_workload(num, input_len, output_len, range_ratio, seed)
    if kind == "shared-prefix":
        per = max(1, num // num_prefixes)
        return shared_prefix_workload(num_prefixes, per, prefix_len, 16, output_len, seed)
    if kind == "multi-turn":
        return multi_turn_workload(num, turns, input_len, output_len, seed)
    if kind == "chat":
        if dataset is None:
            raise UsageError("--workload chat needs --dataset FILE.jsonl")
        return chat_file_workload(dataset, output_len, num)
    raise UsageError(f"unknown --workload '{kind}'; use one of {', '.join(WORKLOADS)}")


def run_serving(
    model: str | None, server_flags: list[str], o: ServingOptions, console: Console
) -> None:
    """Measure TTFT, ITL, TPOT, latency percentiles and throughput; server_flags: the
    engine settings bench was given (--device, the KV cache types, speculative
    decoding's), for local servers."""
    from llmopt.bench.loadgen import LoadSpec, Target
    from llmopt.bench.metrics import DEFAULT_PERCENTILES, SLO
    from llmopt.bench.report import failures, table, to_csv, to_json, write
    from llmopt.bench.serving import local_server, run_benchmark

    checks = [
        (o.num_prompts >= 1, "--num-prompts must be at least 1"),
        (o.concurrency is None or o.concurrency >= 1, "--concurrency must be at least 1"),
        (o.request_rate is None or o.request_rate > 0, "--request-rate must be positive"),
        (o.duration is None or o.duration > 0, "--duration must be positive"),
        (o.num_devices >= 1, "--num-devices must be at least 1"),
        (0 < o.slo_target <= 1, "--slo-target must be in (0, 1]"),
        (
            not (o.url and (o.compare or model or server_flags)),
            "--url measures a running server: drop MODEL, --compare, --device, the KV "
            "cache types and the --speculative options (they start local servers)",
        ),
        (not (o.as_json and o.as_csv), "choose one of --json and --csv"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        pcts = tuple(float(p) for p in o.percentiles.split(",")) or DEFAULT_PERCENTILES
    except ValueError:
        raise UsageError(f"bad --percentiles '{o.percentiles}': use e.g. 50,90,99") from None
    slo_spec = SLO.parse(o.slo) if o.slo else None

    def conversations_for(seed: int) -> list[Conversation]:
        return _workload(
            o.workload,
            o.num_prompts,
            o.input_len,
            o.output_len,
            o.range_ratio,
            o.num_prefixes,
            o.prefix_len,
            o.dataset,
            o.turns,
            seed,
        )

    # Each sweep point gets prompts of its own, and the warm-up others again: a prefix
    # cache must not serve one measurement from an earlier one.
    warm_pool = conversations_for(o.seed + 1_000_003)
    warm = warm_pool[: o.warmup]
    if o.warm_prefixes and not any(c.system for c in warm_pool):
        raise UsageError("--warm-prefixes needs a workload with system prompts (shared-prefix)")
    points: list[tuple[str, float | None]] = [*_sweep(o.sweep)] or [("concurrency", o.concurrency)]
    runs: list[tuple[str, dict]] = []
    for name, args in _configs(o.compare):
        server = (
            nullcontext(Target(o.url, o.served_model, o.api_key, o.timeout))
            if o.url
            else (local_server(model, [*server_flags, *args, *(o.serve_arg or [])], console))
        )
        with server as target:
            target = Target(target.url, o.served_model or target.model, o.api_key, o.timeout)
            for i, (key, value) in enumerate(points):
                spec = LoadSpec(
                    concurrency=int(value) if key == "concurrency" and value else o.concurrency,
                    request_rate=value if key == "request-rate" else o.request_rate,
                    duration_s=o.duration,
                    seed=o.seed,
                )
                label = name if len(points) == 1 else f"{name} {key}={value:g}"
                measured = conversations_for(o.seed + i)
                summary, _ = run_benchmark(
                    target,
                    measured,
                    spec,
                    _with_prefixes(measured, warm_pool) if o.warm_prefixes else warm,
                    pcts,
                    slo_spec,
                    o.num_devices,
                    console,
                    label,
                )
                runs.append((label, summary))
    console.print(table(runs, pcts))
    failures(runs, console)
    if o.plot is not None:
        from llmopt.bench.plot import plot_runs

        swept = o.sweep is not None and o.compare is None  # one line per configuration otherwise
        plot_runs(runs, pcts, o.plot, (points[0][0], [v for _, v in points]) if swept else None)
    if o.output is not None:
        write(o.output, to_csv(runs) if o.output.suffix == ".csv" else to_json(runs) + "\n")
    if o.as_json:
        sys.stdout.write(to_json(runs) + "\n")
    elif o.as_csv:
        sys.stdout.write(to_csv(runs))
    if slo_spec is not None:
        missed = [n for n, r in runs if r["slo_met_fraction"] < o.slo_target]
        if missed:
            console.print(
                f"[red]SLO missed ({o.slo}, target {o.slo_target:.0%}): {', '.join(missed)}[/red]",
                highlight=False,
            )
            raise typer.Exit(1)
