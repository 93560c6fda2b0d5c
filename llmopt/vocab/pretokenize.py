"""The pre-tokenizer splits of byte-level BPE vocabularies (GGUF `tokenizer.ggml.pre`),
as `tokenizers` applies them: each piece of text is BPE-merged on its own.

The patterns need Unicode categories (\\p{L}, \\p{N}) and lookahead, which the `regex`
package has; it gives the pieces of `tokenizers`' Oniguruma patterns.
"""

from __future__ import annotations

from typing import Any

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

# The splits the native tokenizer knows, by their number in its file; smollm's is GPT-2's
# after every digit is cut out on its own.
SPLITS = ("gpt2", "smollm", "llama3", "qwen2")
_NAMES = {"default": "gpt2", "gpt-2": "gpt2", "llama-bpe": "llama3"}
_PATTERNS = {"gpt2": GPT2, "smollm": GPT2, "llama3": LLAMA3, "qwen2": QWEN2}


def split_of(pre: str) -> str | None:
    """The split a GGUF `tokenizer.ggml.pre` names, or None for one not known here."""
    name = _NAMES.get(pre, pre)
    return name if name in _PATTERNS else None


class PreTokenizer:
    def __init__(self, split: str) -> None:
        import regex  # imported here: only byte-level vocabularies need it

        self._pattern: Any = regex.compile(_PATTERNS[split])
        self._digit: Any = regex.compile(r"(\p{N})") if split == "smollm" else None

    def pieces(self, text: str) -> list[str]:
        if self._digit is None:
            return self._isolated(text)
        out: list[str] = []
        # split() with the digit captured alternates the stretches between digits (maybe
        # empty) and the digits.
        for i, part in enumerate(self._digit.split(text)):
            if i % 2:
                out.append(part)
            elif part:
                out.extend(self._isolated(part))
        return out

    def _isolated(self, text: str) -> list[str]:
        """The matches and the text between them (`tokenizers`' Isolated behaviour)."""
        found: list[str] = self._pattern.findall(text)
        if sum(map(len, found)) == len(text):
            return found  # the patterns match every character: the usual case
        out, at = [], 0
        for m in self._pattern.finditer(text):
            if m.start() > at:
                out.append(text[at : m.start()])
            out.append(m.group())
            at = m.end()
        if at < len(text):
            out.append(text[at:])
        return out
