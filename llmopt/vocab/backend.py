"""What a tokenizer backend does for llmopt.tokenizer.Tokenizer, and the Hugging Face
`tokenizers` library's version of it (any tokenizer.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from llmopt import heap
from llmopt.errors import ModelFormatError


class TokenizerBackend(Protocol):
    """Texts to ids and back. Special tokens written in a text are recognised; none are
    added; decoding leaves the special ones out."""

    @property
    def vocab_size(self) -> int: ...

    def token_to_id(self, token: str) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def vocabulary(self) -> dict[str, int]:
        """Every token text with its id (built on demand: it can be big)."""
        ...


class HFBackend:
    def __init__(self, path: Path) -> None:
        # Imported here: a process on the native tokenizer never maps the library.
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ModelFormatError(f"{path} could not be read: {e}") from e
        heap.trim()  # the JSON parse's garbage: twice the tokenizer, on big vocabularies

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def vocabulary(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)
