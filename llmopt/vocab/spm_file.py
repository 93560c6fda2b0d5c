"""The compact SentencePiece vocabulary file (tokenizer.spm) of a converted folder.

A 262k-token vocabulary as tokenizer.json (with the merges transformers derives from
it) is 33 MB on disk and about 100 MB in the `tokenizers` library; here it is the token
texts in one blob, offsets, a merge score and a flag byte per token: a few MB, loaded
with one read. Layout, little-endian:

    header   magic, version, tokens n, blob bytes, unknown id, CRC-32 of the rest
    offsets  u32[n + 1]   token i is blob[offsets[i]:offsets[i + 1]] (UTF-8)
    scores   f32[n]       merge priority of a pair that merges into token i (higher first)
    flags    u8[n]        ADDED | SPECIAL
    blob     the token texts, back to back
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmopt.atomic import atomic_file
from llmopt.errors import ModelFormatError

FILENAME = "tokenizer.spm"
MAGIC = b"LLMSPM\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIIIII4x")  # 32 bytes: the arrays after it stay 4-aligned
NO_TOKEN = 0xFFFFFFFF

ADDED = 1  # matched whole in the raw text before BPE (an added token in `tokenizers`)
SPECIAL = 2  # left out of decoded text (an added token marked special)


@dataclass(frozen=True)
class SpmVocab:
    """A vocabulary to write: texts as the tokenizer spells them, one score and flag each."""

    tokens: list[str]
    scores: list[float]
    flags: list[int]
    unk_id: int | None


@dataclass(frozen=True)
class SpmLayout:
    """A read file: its bytes and where each array starts in them."""

    data: bytearray
    n: int
    unk_id: int | None
    offsets_at: int
    scores_at: int
    flags_at: int
    blob_at: int


def write_spm(vocab: SpmVocab, path: Path) -> None:
    """Write `vocab` to `path` atomically."""
    texts = [t.encode("utf-8", "surrogatepass") for t in vocab.tokens]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype="<u4")
    np.cumsum(lengths, out=offsets[1:])
    body = b"".join(
        [
            offsets.tobytes(),
            np.asarray(vocab.scores, dtype="<f4").tobytes(),
            np.asarray(vocab.flags, dtype=np.uint8).tobytes(),
            b"".join(texts),
        ]
    )
    unk = NO_TOKEN if vocab.unk_id is None else vocab.unk_id
    header = _HEADER.pack(MAGIC, VERSION, len(texts), int(offsets[-1]), unk, zlib.crc32(body))
    with atomic_file(path) as tmp:
        tmp.write_bytes(header + body)


def read_spm(path: Path) -> SpmLayout:
    """The file's bytes, checked whole (a damaged or truncated file is a ModelFormatError)."""
    data = bytearray(path.read_bytes())

    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(
            f"{path} is damaged ({why}); delete its folder and load the GGUF again"
        )

    if len(data) < _HEADER.size:
        raise bad("shorter than its header")
    magic, version, n, blob_len, unk, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise bad("not a tokenizer.spm file")
    if version != VERSION:
        raise bad(f"format version {version}, this llmopt reads {VERSION}")
    offsets_at = _HEADER.size
    scores_at = offsets_at + 4 * (n + 1)
    flags_at = scores_at + 4 * n
    blob_at = flags_at + n
    if len(data) != blob_at + blob_len:
        raise bad(f"{len(data)} bytes where its header says {blob_at + blob_len}")
    if zlib.crc32(memoryview(data)[offsets_at:]) != crc:
        raise bad("checksum mismatch")
    offsets = np.frombuffer(data, dtype="<u4", count=n + 1, offset=offsets_at)
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(offsets[1:] < offsets[:-1]):
        raise bad("token offsets out of order")
    if unk != NO_TOKEN and unk >= n:
        raise bad(f"unknown token id {unk} outside the vocabulary")
    return SpmLayout(
        data, n, None if unk == NO_TOKEN else unk, offsets_at, scores_at, flags_at, blob_at
    )
