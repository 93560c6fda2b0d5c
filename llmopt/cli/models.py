"""`llmopt models` and `llmopt rm NAME`: what is in the store, and removing it."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from llmopt.store.architecture import architecture
from llmopt.store.store import Store


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def list_models(
    available: bool = typer.Option(False, "--all", help="Also list models not pulled yet."),
) -> None:
    """List pulled models: name, architecture, format, quantization, size and path."""
    store = Store()
    table = Table(box=None)
    for col in ("NAME", "ARCH", "FORMAT", "QUANT", "SIZE", "PATH"):
        table.add_column(col)
    pulled = {m.name: m for m in store.list()}
    for m in pulled.values():
        arch = architecture(m.path) or ""
        table.add_row(m.name, arch, m.format, m.quantization or "", _size(m.size), str(m.path))
    if available:
        for name, e in sorted(store.registry.models.items()):
            if name not in pulled:
                size = _size(e.size) if e.size else ""
                table.add_row(name, "", e.format, e.quantization or "", size, "(not pulled)")
    if not table.row_count:
        Console(stderr=True).print("No models pulled yet: llmopt pull (or llmopt models --all)")
        return
    Console().print(table)


def remove(name: str = typer.Argument(..., help="Model name to delete from the store.")) -> None:
    """Delete a pulled model (and its converted copy) from the store."""
    path = Store().remove(name)
    Console(stderr=True).print(f"removed {name} ({path})")
