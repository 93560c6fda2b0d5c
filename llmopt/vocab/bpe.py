"""The native byte-level BPE tokenizer (GPT-2 style: SmolLM, Llama 3, Qwen2): a
tokenizer.spm vocabulary of the byte-level kind (spm_file.py) driven by
llmopt/kernels/spm_tokenizer.c, with the ids and text of the `tokenizers` tokenizer
llmopt/loader/gguf_tokenizer.py builds from the same GGUF vocabulary, in a few MB.

Encoding: the C side finds the added tokens in the raw text; the stretches between them
are cut into pieces by the pre-tokenizer's pattern here (pretokenize.py); the C side
merges each piece's bytes and writes the ids."""

from __future__ import annotations

import ctypes
from array import array
from pathlib import Path
from typing import Any

from llmopt.errors import ModelFormatError
from llmopt.vocab.byte_alphabet import spell, unspell
from llmopt.vocab.native import NativeBackend, bytes_arg
from llmopt.vocab.pretokenize import SPLITS, PreTokenizer
from llmopt.vocab.spm_file import ADDED, KIND_BYTE_LEVEL, VERBATIM, SpmLayout


class BpeBackend(NativeBackend):
    KIND = KIND_BYTE_LEVEL

    def __init__(self, path: Path, layout: SpmLayout, functions: dict[str, Any]) -> None:
        if layout.split >= len(SPLITS):
            raise ModelFormatError(f"{path} names pre-tokenizer {layout.split}, unknown here")
        super().__init__(path, layout, functions)
        self._pre = PreTokenizer(SPLITS[layout.split])

    def piece(self, token_id: int) -> str:
        raw = self.token_bytes(token_id)
        if self.token_flags(token_id) & (ADDED | VERBATIM):
            return raw.decode("utf-8", "surrogatepass")
        return spell(raw)

    def token_to_id(self, token: str) -> int | None:
        # Added and verbatim tokens are in the blob as written, the others as the bytes
        # they spell; the spelling check tells them apart where both are possible.
        for raw in (token.encode("utf-8", "surrogatepass"), unspell(token)):
            found = None if raw is None else self.find(raw)
            if found is not None and self.piece(found) == token:
                return found
        return None

    def _piece_lengths(self, text: str, plan: array) -> None:
        pieces = self._pre.pieces(text)
        if text.isascii():
            plan.extend(map(len, pieces))
        else:
            plan.extend(len(p.encode("utf-8", "surrogatepass")) for p in pieces)

    def encode(self, text: str) -> list[int]:
        raw = text.encode("utf-8", "surrogatepass")
        n = len(raw)
        starts = (ctypes.c_int64 * max(1, n))()
        added = (ctypes.c_int32 * max(1, n))()
        n_added = self._fn["added_tokens"](self._ref, bytes_arg(raw), n, starts, added)
        # The plan: a piece's byte length, or -1 - id for an added token.
        plan = array("i")
        if n_added == 0:
            self._piece_lengths(text, plan)
        else:
            at = 0
            for start, token in zip(starts[:n_added], added[:n_added], strict=True):
                if start > at:
                    self._piece_lengths(raw[at:start].decode("utf-8", "surrogatepass"), plan)
                plan.append(-1 - token)
                at = start + len(self.token_bytes(token))
            if at < n:
                self._piece_lengths(raw[at:].decode("utf-8", "surrogatepass"), plan)
        out = (ctypes.c_int32 * max(1, n))()
        pieces = (ctypes.c_int32 * max(1, len(plan))).from_buffer(plan) if plan else None
        count = self._fn["bpe_encode"](self._ref, bytes_arg(raw), n, pieces, len(plan), out)
        if count == -1:
            raise MemoryError("the tokenizer ran out of memory")
        if count < 0:
            raise AssertionError("the pre-tokenizer's pieces overran the text")
        return out[:count]
