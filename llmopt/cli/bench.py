"""`llmopt bench`: serving benchmarks against any OpenAI-compatible server (--url), or
against the local engine (`llmopt bench MODEL` starts `llmopt serve MODEL` for the
run); `--offline` measures the in-process engine, `--perplexity` a model's quality.
Each mode has its own module and options (bench_serving, bench_offline,
bench_perplexity); this one declares the flags and dispatches.

The table and progress go to stderr; --json / --csv print to stdout (or --output).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from llmopt.cli.bench_offline import OfflineOptions, run_offline
from llmopt.cli.bench_perplexity import PerplexityOptions, run_perplexity
from llmopt.cli.bench_serving import WORKLOADS, ServingOptions, run_serving
from llmopt.cli.engine_options import engine_options
from llmopt.engine.config import KV_CACHE_TYPES, PARALLELISM, SPECULATION, EngineConfig

# The engine settings a local server gets from bench's own flags.
SERVER_SETTINGS = ("device", *KV_CACHE_TYPES, *SPECULATION, *PARALLELISM)


@engine_options(
    "device", "dtype", "threads", "dequantize", *KV_CACHE_TYPES, *SPECULATION, *PARALLELISM
)
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
    depth: int = typer.Option(
        0, "--depth", help="--offline: context tokens of each sequence's own before tg."
    ),
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
        "(int8-rounded activations), also where a fallback kernel would take long "
        "windows densely.",
    ),
    reference: str = typer.Option(
        None,
        "--reference",
        help="--perplexity: also score this model (the unquantized one, same tokenizer; "
        "run dense): its perplexity and the KL divergence from it.",
    ),
    *,
    engine: EngineConfig,
) -> None:
    """Measure TTFT, ITL, TPOT, latency percentiles and throughput of a server."""
    console = Console(stderr=True)
    engine = engine.replace(model=model)
    if perplexity:
        opts = PerplexityOptions(
            text, ppl_tokens, window, stride, decode_arithmetic, reference, as_json, output
        )
        run_perplexity(engine, opts, console)
    elif offline:
        run_offline(
            engine, OfflineOptions(pp, tg, batch, repeats, seed, depth, as_json, output), console
        )
    else:
        serving = ServingOptions(
            url, served_model, api_key, workload, num_prompts, input_len, output_len,
            range_ratio, num_prefixes, prefix_len, dataset, turns, concurrency, request_rate,
            duration, warmup, warm_prefixes, seed, timeout, percentiles, slo, slo_target,
            num_devices, compare, sweep, serve_arg, as_json, as_csv, output, plot,
        )  # fmt: skip
        run_serving(model, engine.flags(*SERVER_SETTINGS), serving, console)
