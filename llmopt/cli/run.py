"""`llmopt run [MODEL] [PROMPT]`: one-shot generation for scripts, or an interactive chat.

Generated text goes to stdout; progress and stats go to stderr.
"""

from __future__ import annotations

import json
import sys

import torch
import typer
from rich.console import Console

from llmopt.cli import options
from llmopt.cli.chat import Chat
from llmopt.device import resolve_device, resolve_dtype
from llmopt.engine.engine import Engine
from llmopt.engine.llm import build_engine
from llmopt.engine.outputs import RequestStats
from llmopt.engine.sampling_params import SamplingParams
from llmopt.engine.scheduler import SchedulerConfig
from llmopt.errors import UsageError
from llmopt.loader.load import load_model, runs_quantized
from llmopt.store.resolve import is_model_ref, resolve
from llmopt.store.store import Store


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)


def check_engine_options(
    device: str, dtype: str, ctx_size: int | None, kv_cache_memory: float | None
) -> None:
    resolve_dtype(dtype, resolve_device(device))
    if ctx_size is not None and ctx_size < 1:
        raise UsageError("--ctx-size must be positive")
    if kv_cache_memory is not None and kv_cache_memory <= 0:
        raise UsageError("--kv-cache-memory must be a positive number of GB")


def open_engine(
    model: str | None,
    device: str,
    dtype: str,
    ctx_size: int | None,
    kv_cache_memory: float | None,
    console: Console,
    scheduler_config: SchedulerConfig | None = None,
    prefix_cache: bool = True,
    dequantize: bool = False,
) -> tuple[str, Engine]:
    check_engine_options(device, dtype, ctx_size, kv_cache_memory)
    store = Store()
    name, path = resolve(model, store, console)
    dev = resolve_device(device)
    quantized = runs_quantized(path, dev, store, console, dequantize)
    dt = resolve_dtype(dtype, dev, quantized=quantized)
    loaded = load_model(path, dt, dev, store, console, dequantize)
    engine = build_engine(
        loaded, ctx_size, kv_cache_memory, scheduler_config, prefix_cache=prefix_cache
    )
    return name, engine


def format_stats(s: RequestStats) -> str:
    return (
        f"{s.prompt_tokens} prompt tokens ({s.cached_prompt_tokens} reused from cache), "
        f"{s.completion_tokens} generated; "
        f"time to first token {s.ttft_s * 1000:.0f} ms ({s.prefill_tokens_per_s:.0f} tok/s), "
        f"decode {s.decode_tokens_per_s:.1f} tok/s"
    )


def run(
    model: str = typer.Argument(None, help="Registry name, .gguf file or HF folder."),
    prompt: str = typer.Argument(None, help="Prompt for a one-shot answer; '-' reads stdin."),
    system: str = typer.Option(None, "--system", "-s", help="System message."),
    temperature: float = typer.Option(0.7, "--temperature", "-t", help="0 means greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k likeliest tokens (0: off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1: off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Drop tokens below min_p x the top one."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty"),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty"),
    max_tokens: int = typer.Option(None, "--max-tokens", "-n", help="Default: until EOS."),
    seed: int = typer.Option(None, "--seed", help="Same seed, same text."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    raw: bool = typer.Option(False, "--raw", help="Send the prompt as is, no chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object at the end."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    ctx_size: int = options.CTX_SIZE,
    kv_cache_memory: float = options.KV_CACHE_MEMORY,
    threads: int = options.THREADS,
    dequantize: bool = options.DEQUANTIZE,
) -> None:
    """Chat with a model, or answer one prompt (argument or piped stdin) and exit."""
    console = Console(stderr=True)
    store = Store()
    if model is not None and prompt is None and not is_model_ref(model, store):
        model, prompt = None, model  # `llmopt run "question"` uses the default model
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise UsageError("stdin was empty: nothing to answer")
    set_threads(threads)
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        max_tokens=max_tokens,
        seed=seed,
        stop=tuple(stop or ()),
    )
    name, engine = open_engine(
        model, device, dtype, ctx_size, kv_cache_memory, console, dequantize=dequantize
    )
    chat = Chat(engine, name, params, system, console)
    if prompt is None:
        chat.repl()
        return
    ids = chat.prompt_ids(prompt, raw)
    text, last = chat.stream(ids, echo=not as_json)
    stats = last.stats
    assert stats is not None
    if as_json:
        out = {"model": name, "text": text, "finish_reason": last.finish_reason}
        print(json.dumps(out | stats.as_dict()))
    else:
        if not text.endswith("\n"):
            print(flush=True)
        console.print(f"[dim]{format_stats(stats)}[/dim]", highlight=False)
    if last.finish_reason == "abort":
        raise typer.Exit(130)
