"""Text for calibration and evaluation: Python's own `pydoc_data.topics` (about 465 KB
of English reference prose in every CPython), split in two by topic name so that
quantization calibrates on one half and perplexity is scored on the other; or a
file the user names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmopt.errors import UsageError


def _pydoc_half(second: bool) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    half = len(names) // 2
    return "\n\n".join(topics[n] for n in (names[half:] if second else names[:half]))


def calibration_text() -> str:
    return _pydoc_half(second=False)


def held_out_text() -> str:
    return _pydoc_half(second=True)


def read_text(path: Path | None, default: Callable[[], str], option: str) -> str:
    """The file given with `option`, or the default text; a clear error if unreadable."""
    if path is None:
        return default()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {option} {path}: {e}") from None
    if not text.strip():
        raise UsageError(f"{option} {path} is empty")
    return text
