"""`llmopt pull NAME`: fetch a registry model into the store and prepare it."""

from __future__ import annotations

import typer
from rich.console import Console

from llmopt.loader.load import hf_folder_for
from llmopt.store.fetch import pull
from llmopt.store.store import Store


def pull_cmd(
    name: str = typer.Argument(None, help="Model name from models.toml (default: the default)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even if present."),
) -> None:
    """Download a model into the store, check its sha256, and convert it for fast loads."""
    console = Console(stderr=True)
    store = Store()
    name = name or store.registry.default_name()
    path = pull(store, name, console, force=force)
    # Convert now so that the first `run` starts quickly.
    hf_folder_for(path, store, console)
    console.print(f"[green]{name}[/green] ready at {path}")
