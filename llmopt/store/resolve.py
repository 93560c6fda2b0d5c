"""Turn what the user typed (a registry name, a path, or nothing) into a model path."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from llmopt.errors import ModelNotFoundError
from llmopt.store.fetch import pull
from llmopt.store.store import Store


def is_model_ref(text: str, store: Store) -> bool:
    """Whether a lone positional argument names a model rather than being a prompt."""
    return text in store.registry.models or Path(text).expanduser().exists()


def resolve(spec: str | None, store: Store, console: Console) -> tuple[str, Path]:
    """Return (display name, path); a registry model not yet in the store is pulled."""
    name = spec or store.registry.default_name()
    path = Path(name).expanduser()
    if path.exists():
        return path.name, path
    if name not in store.registry.models and (name.endswith(".gguf") or "/" in name):
        raise ModelNotFoundError(f"{name} does not exist")
    entry = store.registry.get(name)
    if not store.is_pulled(entry):
        console.print(f"[dim]{name} is not in the store yet; pulling it[/dim]")
    return name, pull(store, name, console)
