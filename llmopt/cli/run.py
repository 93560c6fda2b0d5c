"""`llmopt run [MODEL] [PROMPT]`: one-shot generation for scripts, or an interactive chat.

Generated text goes to stdout; progress and stats go to stderr.
"""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from llmopt.cli.chat import Chat
from llmopt.cli.common import format_stats
from llmopt.cli.engine_options import LOADING, engine_options
from llmopt.engine.config import SPECULATION, EngineConfig
from llmopt.engine.factory import open_engine
from llmopt.engine.sampling_params import SamplingParams
from llmopt.errors import UsageError
from llmopt.store.resolve import is_model_ref
from llmopt.store.store import Store


@engine_options(*LOADING, *SPECULATION)
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
    *,
    engine: EngineConfig,
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
    # One conversation at a time: a single-stream engine (which picks its dtype so).
    opened = open_engine(engine.replace(model=model, max_num_seqs=1), console)
    chat = Chat(opened.engine, opened.name, params, system, console)
    if prompt is None:
        chat.repl()
        return
    ids = chat.prompt_ids(prompt, raw)
    text, last = chat.stream(ids, echo=not as_json)
    stats = last.stats
    assert stats is not None
    if as_json:
        out = {"model": opened.name, "text": text, "finish_reason": last.finish_reason}
        print(json.dumps(out | stats.as_dict()))
    else:
        if not text.endswith("\n"):
            print(flush=True)
        console.print(f"[dim]{format_stats(stats)}[/dim]", highlight=False)
    if last.finish_reason == "abort":
        raise typer.Exit(130)
