"""The native SentencePiece BPE tokenizer: a tokenizer.spm vocabulary (spm_file.py)
driven by llmopt/kernels/spm_tokenizer.c, with the ids and text of the Hugging Face
tokenizer transformers builds from the same GGUF vocabulary, in a few MB."""

from __future__ import annotations

import ctypes
import struct
from functools import cache
from pathlib import Path
from typing import Any

from llmopt.kernels import build
from llmopt.vocab.spm_file import NO_TOKEN, read_spm

_MAX_ADDED_LENS = 256
_u8p = ctypes.POINTER(ctypes.c_uint8)


class _Model(ctypes.Structure):
    """The C side's SpmModel (llmopt/kernels/spm_tokenizer.c): keep the two in step."""

    _fields_ = [
        ("n", ctypes.c_uint32),
        ("mask", ctypes.c_uint32),
        ("unk", ctypes.c_uint32),
        ("n_added_lens", ctypes.c_uint32),
        ("blob", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("scores", ctypes.c_void_p),
        ("flags", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("byte_ids", ctypes.c_uint32 * 256),
        ("added_lens", ctypes.c_uint32 * _MAX_ADDED_LENS),
        ("added_first", ctypes.c_uint8 * 256),
    ]


@cache
def _functions() -> dict[str, Any] | None:
    """The C functions, or None without a C compiler."""
    model = ctypes.POINTER(_Model)
    i32p, i64 = ctypes.POINTER(ctypes.c_int32), ctypes.c_int64
    index = build.function("spm_tokenizer", [model], ctypes.c_int32, symbol="spm_index")
    if index is None:
        return None
    return {
        "index": index,
        "find": build.function("spm_tokenizer", [model, _u8p, i64], i64, symbol="spm_find"),
        "encode": build.function(
            "spm_tokenizer", [model, _u8p, i64, i32p], i64, symbol="spm_encode"
        ),
        "decode": build.function(
            "spm_tokenizer",
            [model, i32p, i64, ctypes.c_int32, _u8p, i64],
            i64,
            symbol="spm_decode",
        ),
    }


def native_available() -> bool:
    return _functions() is not None


def _bytes_arg(data: bytes) -> Any:
    return ctypes.cast(ctypes.c_char_p(data), _u8p)


class SpmBackend:
    """Use `load`: it answers None where the C code cannot be built."""

    def __init__(self, path: Path, functions: dict[str, Any]) -> None:
        self._fn = functions
        layout = read_spm(path)
        self._data = layout.data  # the arrays the C side reads: kept alive here
        base = ctypes.addressof((ctypes.c_uint8 * len(layout.data)).from_buffer(layout.data))
        # A table at most half full keeps probes short; 4 bytes a slot.
        size = 1 << max(4, (2 * layout.n - 1).bit_length())
        self._table = (ctypes.c_uint32 * size)()
        ctypes.memset(self._table, 0xFF, ctypes.sizeof(self._table))
        self._model = _Model(
            n=layout.n,
            mask=size - 1,
            unk=NO_TOKEN if layout.unk_id is None else layout.unk_id,
            blob=base + layout.blob_at,
            offsets=base + layout.offsets_at,
            scores=base + layout.scores_at,
            flags=base + layout.flags_at,
            table=ctypes.addressof(self._table),
        )
        self._ref = ctypes.byref(self._model)
        if self._fn["index"](self._ref) != 0:
            from llmopt.errors import ModelFormatError

            raise ModelFormatError(f"{path}: its added tokens have too many distinct lengths")
        self._layout = layout

    @classmethod
    def load(cls, path: Path) -> SpmBackend | None:
        functions = _functions()
        return None if functions is None else cls(path, functions)

    @property
    def vocab_size(self) -> int:
        return self._model.n

    def token_to_id(self, token: str) -> int | None:
        raw = token.encode("utf-8", "surrogatepass")
        found = self._fn["find"](self._ref, _bytes_arg(raw), len(raw))
        return None if found < 0 else found

    def encode(self, text: str) -> list[int]:
        raw = text.encode("utf-8", "surrogatepass")
        out = (ctypes.c_int32 * max(1, len(raw)))()
        n = self._fn["encode"](self._ref, _bytes_arg(raw), len(raw), out)
        if n < 0:
            raise MemoryError("the tokenizer ran out of memory")
        return out[:n]

    def decode(self, ids: list[int]) -> str:
        arr = (ctypes.c_int32 * max(1, len(ids)))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            out = (ctypes.c_uint8 * cap)()
            n = self._fn["decode"](self._ref, arr, len(ids), 1, out, cap)
            if n >= 0:
                return ctypes.string_at(out, n).decode("utf-8", "replace")
            if n == -(2**63):
                raise MemoryError("the tokenizer ran out of memory")
            cap = -n

    def piece(self, token_id: int) -> str:
        """The text of one token as the vocabulary spells it."""
        lo = self._layout
        start, end = struct.unpack_from("<II", lo.data, lo.offsets_at + 4 * token_id)
        return lo.data[lo.blob_at + start : lo.blob_at + end].decode("utf-8", "surrogatepass")

    def vocabulary(self) -> dict[str, int]:
        # Later ids win on a text spelled twice, as the hash table's lookups do.
        return {self.piece(i): i for i in range(self._model.n)}

    def same_file(self, other: SpmBackend) -> bool:
        """Whether both read the same vocabulary (cheaper than comparing dicts)."""
        return self._data == other._data
