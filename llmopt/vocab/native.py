"""What the native tokenizers share: the C side's model (llmopt/kernels/spm_tokenizer.c)
over a read vocabulary file (spm_file.py), its hash tables, lookups and decoding. The
SentencePiece and byte-level backends (spm.py, bpe.py) add their encoding and spelling."""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Self

from llmopt.errors import ModelFormatError
from llmopt.kernels import build
from llmopt.vocab.spm_file import NO_TOKEN, SpmLayout, read_spm

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
        ("kind", ctypes.c_uint32),
        ("n_merges", ctypes.c_uint32),
        ("merge_mask", ctypes.c_uint32),
        ("merges", ctypes.c_void_p),
        ("merge_table", ctypes.c_void_p),
    ]


@cache
def functions() -> dict[str, Any] | None:
    """The C functions, or None without a C compiler."""
    model = ctypes.POINTER(_Model)
    i32p, i64 = ctypes.POINTER(ctypes.c_int32), ctypes.c_int64

    def fn(symbol: str, args: list[Any]) -> Any:
        return build.function("spm_tokenizer", [model, *args], i64, symbol=symbol)

    index = build.function("spm_tokenizer", [model], ctypes.c_int32, symbol="spm_index")
    if index is None:
        return None
    return {
        "index": index,
        "find": fn("spm_find", [_u8p, i64]),
        "encode": fn("spm_encode", [_u8p, i64, i32p]),
        "added_tokens": fn("spm_added_tokens", [_u8p, i64, ctypes.POINTER(i64), i32p]),
        "bpe_encode": fn("bpe_encode", [_u8p, i64, i32p, i64, i32p]),
        "decode": fn("spm_decode", [i32p, i64, ctypes.c_int32, _u8p, i64]),
    }


def native_available() -> bool:
    return functions() is not None


def bytes_arg(data: bytes) -> Any:
    return ctypes.cast(ctypes.c_char_p(data), _u8p)


def _hash_table(entries: int) -> Any:
    """An open-addressing table at most half full (short probes), all slots empty."""
    table = (ctypes.c_uint32 * (1 << max(4, (2 * entries - 1).bit_length())))()
    ctypes.memset(table, 0xFF, ctypes.sizeof(table))
    return table


class NativeBackend:
    """Use `load`: it answers None where the C code cannot be built."""

    KIND: ClassVar[int]

    def __init__(self, path: Path, layout: SpmLayout, functions: dict[str, Any]) -> None:
        if layout.kind != self.KIND:
            raise ModelFormatError(f"{path} is not a vocabulary of the kind {type(self).__name__}")
        self._fn = functions
        self._path = path
        self._layout = layout
        self._data = layout.data  # the arrays the C side reads: kept alive here
        base = ctypes.addressof((ctypes.c_uint8 * len(layout.data)).from_buffer(layout.data))
        self._table = _hash_table(layout.n)
        self._merge_table = _hash_table(layout.n_merges)
        self._model = _Model(
            n=layout.n,
            mask=len(self._table) - 1,
            unk=NO_TOKEN if layout.unk_id is None else layout.unk_id,
            blob=base + layout.blob_at,
            offsets=base + layout.offsets_at,
            scores=None if layout.scores_at is None else base + layout.scores_at,
            flags=base + layout.flags_at,
            table=ctypes.addressof(self._table),
            kind=layout.kind,
            n_merges=layout.n_merges,
            merge_mask=len(self._merge_table) - 1,
            merges=None if layout.merges_at is None else base + layout.merges_at,
            merge_table=ctypes.addressof(self._merge_table),
        )
        if layout.byte_ids_at is not None:
            ctypes.memmove(self._model.byte_ids, base + layout.byte_ids_at, 4 * 256)
        self._ref = ctypes.byref(self._model)
        if self._fn["index"](self._ref) != 0:
            raise ModelFormatError(f"{path}: its added tokens have too many distinct lengths")

    @classmethod
    def load(cls, path: Path) -> Self | None:
        fns = functions()
        return None if fns is None else cls(path, read_spm(path), fns)

    @property
    def vocab_size(self) -> int:
        return self._model.n

    def find(self, text: bytes) -> int | None:
        """The (last) token whose blob text is `text`."""
        found = self._fn["find"](self._ref, bytes_arg(text), len(text))
        return None if found < 0 else found

    def token_bytes(self, token_id: int) -> bytes:
        """The blob's text of one token."""
        lo = self._layout
        offsets = memoryview(lo.data)[lo.offsets_at : lo.flags_at].cast("I")
        return bytes(lo.data[lo.blob_at + offsets[token_id] : lo.blob_at + offsets[token_id + 1]])

    def token_flags(self, token_id: int) -> int:
        return self._data[self._layout.flags_at + token_id]

    def piece(self, token_id: int) -> str:
        """The text of one token as the vocabulary spells it."""
        raise NotImplementedError

    def decode_bytes(self, ids: list[int]) -> bytes:
        arr = (ctypes.c_int32 * max(1, len(ids)))(*ids)
        cap = 8 * len(ids) + 16
        while True:
            out = (ctypes.c_uint8 * cap)()
            n = self._fn["decode"](self._ref, arr, len(ids), 1, out, cap)
            if n >= 0:
                return ctypes.string_at(out, n)
            if n == -(2**63):
                raise MemoryError("the tokenizer ran out of memory")
            cap = -n

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", "replace")

    def vocabulary(self) -> dict[str, int]:
        # Later ids win on a text spelled twice, as the hash table's lookups do.
        return {self.piece(i): i for i in range(self._model.n)}

    def same_file(self, other: NativeBackend) -> bool:
        """Whether both read the same vocabulary (cheaper than comparing dicts)."""
        return self._data == other._data
