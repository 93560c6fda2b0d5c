"""The native SentencePiece BPE tokenizer: a tokenizer.spm vocabulary (spm_file.py)
driven by llmopt/kernels/spm_tokenizer.c, with the ids and text of the Hugging Face
tokenizer transformers builds from the same GGUF vocabulary, in a few MB."""

from __future__ import annotations

import ctypes

from llmopt.vocab.native import NativeBackend, bytes_arg, native_available
from llmopt.vocab.spm_file import KIND_SPM

__all__ = ["SpmBackend", "native_available"]


class SpmBackend(NativeBackend):
    KIND = KIND_SPM

    def token_to_id(self, token: str) -> int | None:
        return self.find(token.encode("utf-8", "surrogatepass"))

    def encode(self, text: str) -> list[int]:
        raw = text.encode("utf-8", "surrogatepass")
        out = (ctypes.c_int32 * max(1, len(raw)))()
        n = self._fn["encode"](self._ref, bytes_arg(raw), len(raw), out)
        if n < 0:
            raise MemoryError("the tokenizer ran out of memory")
        return out[:n]

    def piece(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", "surrogatepass")
