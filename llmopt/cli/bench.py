"""`llmopt bench`: serving benchmarks against any OpenAI-compatible server (--url), or
against the local engine (`llmopt bench MODEL` starts `llmopt serve MODEL` for the
run), with side-by-side comparisons of engine configurations and sweeps.

The table and progress go to stderr; --json / --csv print to stdout (or --output).
Exit code 1 when an --slo is missed, so that scripts can gate on it.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import replace
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
from llmopt.cli import options
from llmopt.errors import UsageError

WORKLOADS = ("random", "shared-prefix", "chat", "multi-turn")
# The optimization stack: each configuration adds one layer to the one before.
STACK = [
    ("static batching", ["--batching", "static", "--no-prefix-cache"]),
    ("+ continuous batching", ["--batching", "continuous", "--no-prefix-cache"]),
    ("+ prefix cache", ["--batching", "continuous", "--prefix-cache"]),
]
COMPARE_AXES = {
    "batching": lambda v: ["--batching", v],
    "prefix-cache": lambda v: [
        "--prefix-cache" if v in ("on", "true", "1") else "--no-prefix-cache"
    ],
    "dtype": lambda v: ["--dtype", v],
    "weights": lambda v: ["--dequantize"] if v == "dense" else [],  # or "gguf": as stored
    "max-num-seqs": lambda v: ["--max-num-seqs", v],
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


def _emit(result: dict, as_json: bool, output: Path | None) -> None:
    """One result object as JSON: to --output (atomically) and/or stdout."""
    from llmopt.bench.report import write

    text = json.dumps(result, indent=2) + "\n"
    if output is not None:
        write(output, text)
    if as_json:
        sys.stdout.write(text)


def _perplexity(
    model: str | None,
    text: Path | None,
    tokens: int,
    window: int,
    stride: int,
    device: str,
    dtype: str,
    dequantize: bool,
    threads: int | None,
    decode_arithmetic: bool,
    as_json: bool,
    output: Path | None,
    console: Console,
) -> None:
    from llmopt.bench.perplexity import evaluate
    from llmopt.cli.run import set_threads
    from llmopt.corpus import held_out_text, read_text
    from llmopt.engine.llm import LLM
    from llmopt.layers.quant_linear import use_decode_arithmetic

    set_threads(threads)
    llm = LLM(model, device=device, dtype=dtype, prefix_cache=False, dequantize=dequantize)
    if decode_arithmetic and use_decode_arithmetic(llm.loaded.model) == 0:
        raise UsageError(
            "--decode-arithmetic: the model has no quantized linears with a CPU decode kernel"
        )
    scores = evaluate(
        llm.engine,
        llm.loaded.tokenizer,
        read_text(text, held_out_text, "--text"),
        tokens,
        window,
        stride,
    )
    result = {"model": llm.name, "decode_arithmetic": decode_arithmetic} | scores
    console.print(
        f"perplexity {result['perplexity']:.3f} over {result['scored_tokens']} tokens "
        f"(window {result['window']}, stride {result['stride']}, {result['seconds']:.0f} s)",
        highlight=False,
    )
    _emit(result, as_json, output)


def _offline(
    model: str | None,
    pp: int,
    tg: int,
    batch: int,
    repeats: int,
    device: str,
    dtype: str,
    dequantize: bool,
    threads: int | None,
    seed: int,
    as_json: bool,
    output: Path | None,
    console: Console,
) -> None:
    import torch
    from rich.table import Table

    from llmopt.bench.offline import offline_bench
    from llmopt.bench.setup import machine_info
    from llmopt.cli.run import set_threads
    from llmopt.engine.llm import LLM

    if min(pp, tg, batch, repeats) < 1:
        raise UsageError("--pp, --tg, --batch and --repeats must be at least 1")
    set_threads(threads)
    llm = LLM(
        model,
        device=device,
        dtype=dtype,
        max_num_seqs=max(batch, 1),
        prefix_cache=False,
        max_num_batched_tokens=max(pp, 512),
        dequantize=dequantize,
    )
    dtype_name = str(next(llm.loaded.model.parameters()).dtype).removeprefix("torch.")
    result = (
        {"model": llm.name, "dtype": dtype_name}
        | offline_bench(llm.engine, pp, tg, batch, repeats, seed)
        | machine_info(torch.get_num_threads(), llm.engine.runner.device)
    )
    t = Table("test", "tokens/s", header_style="bold")
    for key, v in result.items():
        if isinstance(v, dict):
            t.add_row(key.removesuffix("_tokens_per_s"), f"{v['mean']:.2f} ± {v['std']:.2f}")
    console.print(t)
    _emit(result, as_json, output)


def bench(
    model: str = typer.Argument(None, help="Local model to serve and measure (no --url)."),
    url: str = typer.Option(None, "--url", help="Measure this OpenAI-compatible server."),
    served_model: str = typer.Option(None, "--model", help="Model name to send with --url."),
    api_key: str = typer.Option(None, "--api-key", envvar="LLMOPT_API_KEY"),
    workload: str = typer.Option("random", "--workload", help="|".join(WORKLOADS)),
    num_prompts: int = typer.Option(64, "--num-prompts", "-n"),
    input_len: int = typer.Option(128, "--input-len", help="Prompt words (random, multi-turn)."),
    output_len: int = typer.Option(64, "--output-len", help="Tokens to generate per request."),
    range_ratio: float = typer.Option(0.0, "--range-ratio", help="Lengths vary by +-ratio."),
    num_prefixes: int = typer.Option(4, "--num-prefixes", help="shared-prefix: prompts."),
    prefix_len: int = typer.Option(1000, "--prefix-len", help="shared-prefix: words each."),
    dataset: Path = typer.Option(None, "--dataset", help="chat: JSONL of {messages}."),
    turns: int = typer.Option(3, "--turns", help="multi-turn: turns per conversation."),
    concurrency: int = typer.Option(None, "--concurrency", "-c", help="Requests in flight."),
    request_rate: float = typer.Option(None, "--request-rate", help="Poisson arrivals/s."),
    duration: float = typer.Option(None, "--duration", help="Seconds; cycles the workload."),
    warmup: int = typer.Option(1, "--warmup", help="Requests sent first, not measured."),
    warm_prefixes: bool = typer.Option(
        False,
        "--warm-prefixes",
        help="Warm up with one request per system prompt of the workload (questions of "
        "their own): a server that has served its system prompts before.",
    ),
    seed: int = typer.Option(0, "--seed"),
    timeout: float = typer.Option(600.0, "--timeout", help="Per request, seconds."),
    percentiles: str = typer.Option("50,90,99", "--percentiles"),
    slo: str = typer.Option(None, "--slo", help="e.g. ttft=500,tpot=50 (ms)."),
    slo_target: float = typer.Option(0.99, "--slo-target", help="Share that must meet it."),
    num_devices: int = typer.Option(1, "--num-devices", help="For tokens/s per device."),
    compare: str = typer.Option(None, "--compare", help="stack, or KEY=V1,V2 (local model)."),
    sweep: str = typer.Option(None, "--sweep", help="concurrency=1,4,16 or request-rate=..."),
    serve_arg: list[str] = typer.Option(None, "--serve-arg", help="Extra `llmopt serve` flag."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
    as_csv: bool = typer.Option(False, "--csv", help="Print CSV to stdout."),
    output: Path = typer.Option(None, "--output", "-o", help="Write .json or .csv here."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of the results here."),
    offline: bool = typer.Option(False, "--offline", help="In-process engine: pp/tg/batch."),
    pp: int = typer.Option(512, "--pp", help="--offline: prompt tokens to process."),
    tg: int = typer.Option(128, "--tg", help="--offline: tokens to generate."),
    batch: int = typer.Option(16, "--batch", help="--offline: sequences for batch tg."),
    repeats: int = typer.Option(3, "--repeats", help="--offline: repetitions."),
    device: str = options.DEVICE,
    dtype: str = typer.Option("auto", "--dtype", help="--offline: model dtype."),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="--offline, --perplexity: a GGUF's weights dense."
    ),
    threads: int = typer.Option(None, "--threads", help="--offline: torch threads."),
    perplexity: bool = typer.Option(False, "--perplexity", help="Perplexity of MODEL."),
    text: Path = typer.Option(
        None,
        "--text",
        help="--perplexity: text file (default: held-out half of pydoc_data.topics).",
    ),
    ppl_tokens: int = typer.Option(8192, "--ppl-tokens", help="--perplexity: tokens scored."),
    window: int = typer.Option(1024, "--window", help="--perplexity: window tokens."),
    stride: int = typer.Option(
        None, "--stride", help="--perplexity: window step (default: half the window)."
    ),
    decode_arithmetic: bool = typer.Option(
        False,
        "--decode-arithmetic",
        help="--perplexity: quantized linears compute every row as decode does "
        "(int8-rounded activations; slower).",
    ),
) -> None:
    """Measure TTFT, ITL, TPOT, latency percentiles and throughput of a server."""
    # Imported here: the HTTP client and reports are not needed by other commands.
    from llmopt.bench.loadgen import LoadSpec, Target
    from llmopt.bench.metrics import DEFAULT_PERCENTILES, SLO
    from llmopt.bench.report import failures, table, to_csv, to_json, write
    from llmopt.bench.serving import local_server, run_benchmark

    console = Console(stderr=True)
    if perplexity:
        _perplexity(
            model, text, ppl_tokens, window, stride, device, dtype, dequantize, threads,
            decode_arithmetic, as_json, output, console,
        )  # fmt: skip
        return
    if offline:
        _offline(
            model, pp, tg, batch, repeats, device, dtype, dequantize, threads, seed, as_json,
            output, console,
        )  # fmt: skip
        return
    checks = [
        (num_prompts >= 1, "--num-prompts must be at least 1"),
        (concurrency is None or concurrency >= 1, "--concurrency must be at least 1"),
        (request_rate is None or request_rate > 0, "--request-rate must be positive"),
        (duration is None or duration > 0, "--duration must be positive"),
        (num_devices >= 1, "--num-devices must be at least 1"),
        (0 < slo_target <= 1, "--slo-target must be in (0, 1]"),
        (
            not (url and (compare or model or device != "auto")),
            "--url measures a running server: drop MODEL, --compare and --device "
            "(they start local servers)",
        ),
        (not (as_json and as_csv), "choose one of --json and --csv"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        pcts = tuple(float(p) for p in percentiles.split(",")) or DEFAULT_PERCENTILES
    except ValueError:
        raise UsageError(f"bad --percentiles '{percentiles}': use e.g. 50,90,99") from None
    slo_spec = SLO.parse(slo) if slo else None

    def conversations_for(seed: int) -> list[Conversation]:
        return _workload(
            workload,
            num_prompts,
            input_len,
            output_len,
            range_ratio,
            num_prefixes,
            prefix_len,
            dataset,
            turns,
            seed,
        )

    # Each sweep point gets prompts of its own, and the warm-up others again: a prefix
    # cache must not serve one measurement from an earlier one.
    warm_pool = conversations_for(seed + 1_000_003)
    warm = warm_pool[:warmup]
    if warm_prefixes and not any(c.system for c in warm_pool):
        raise UsageError("--warm-prefixes needs a workload with system prompts (shared-prefix)")
    points: list[tuple[str, float | None]] = [*_sweep(sweep)] or [("concurrency", concurrency)]
    device_arg = [] if device == "auto" else ["--device", device]  # for the local servers
    runs: list[tuple[str, dict]] = []
    for name, args in _configs(compare):
        server = (
            nullcontext(Target(url, served_model, api_key, timeout))
            if url
            else (local_server(model, [*args, *device_arg, *(serve_arg or [])], console))
        )
        with server as target:
            target = Target(target.url, served_model or target.model, api_key, timeout)
            for i, (key, value) in enumerate(points):
                spec = LoadSpec(
                    concurrency=int(value) if key == "concurrency" and value else concurrency,
                    request_rate=value if key == "request-rate" else request_rate,
                    duration_s=duration,
                    seed=seed,
                )
                label = name if len(points) == 1 else f"{name} {key}={value:g}"
                measured = conversations_for(seed + i)
                summary, _ = run_benchmark(
                    target,
                    measured,
                    spec,
                    _with_prefixes(measured, warm_pool) if warm_prefixes else warm,
                    pcts,
                    slo_spec,
                    num_devices,
                    console,
                    label,
                )
                runs.append((label, summary))
    console.print(table(runs, pcts))
    failures(runs, console)
    if plot is not None:
        from llmopt.bench.plot import plot_runs

        swept = sweep is not None and compare is None  # one line per configuration otherwise
        plot_runs(runs, pcts, plot, (points[0][0], [v for _, v in points]) if swept else None)
    if output is not None:
        write(output, to_csv(runs) if output.suffix == ".csv" else to_json(runs) + "\n")
    if as_json:
        sys.stdout.write(to_json(runs) + "\n")
    elif as_csv:
        sys.stdout.write(to_csv(runs))
    if slo_spec is not None:
        missed = [n for n, r in runs if r["slo_met_fraction"] < slo_target]
        if missed:
            console.print(
                f"[red]SLO missed ({slo}, target {slo_target:.0%}): {', '.join(missed)}[/red]",
                highlight=False,
            )
            raise typer.Exit(1)
