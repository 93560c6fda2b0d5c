"""Incremental detokenization: text deltas from a growing list of token ids.

Decoding each new token alone breaks words whose bytes span tokens (and byte-level
BPE emits half a UTF-8 character as U+FFFD). Instead decode a short window of
recent tokens twice, with and without the new ones, and emit the difference once
it no longer ends in an incomplete character.
"""

from __future__ import annotations

from llmopt.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the context window
        self.read_offset = 0  # tokens before this are already in emitted text

    def add(self, token_id: int) -> str:
        """Append one token and return the text it completes (maybe empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset])
        full = decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Text of trailing tokens still held back (an incomplete character at the end)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
