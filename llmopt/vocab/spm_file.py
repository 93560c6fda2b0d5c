"""The compact vocabulary files of the native tokenizers in a converted folder, of one
of two kinds: SentencePiece (Gemma: tokenizer.spm) or byte-level BPE (GPT-2 style:
tokenizer.bpe).

A 262k-token vocabulary as tokenizer.json (with the merges transformers derives from
it) is 33 MB on disk and about 100 MB in the `tokenizers` library; here it is the token
texts in one blob, offsets, a flag byte per token and what the kind merges by: a few MB,
loaded with one read. Layout, little-endian, the 4-byte arrays first:

    header   magic, version (2), kind, tokens n, blob bytes, unknown id, merges m, split
             (byte-level: the pre-tokenizer, an index in vocab/pretokenize.py's SPLITS),
             CRC-32 of the rest
    offsets  u32[n + 1]   token i is blob[offsets[i]:offsets[i + 1]]
    scores   f32[n]       SentencePiece: merge priority of a pair that merges into token i
    byte_ids u32[256]     byte-level: the token of each single byte (or NO_TOKEN)
    merges   u32[3 m]     byte-level: (left id, right id, merged id) of each rank
    flags    u8[n]        ADDED | SPECIAL | VERBATIM | SHADOWED
    blob     the token texts, back to back: UTF-8, but a byte-level vocabulary's ordinary
             tokens are their raw bytes (GPT-2's byte-to-character spelling undone)

SentencePiece files are written as version 1 (as before the byte-level kind): a 32-byte
header without kind, merges and split. An older llmopt reads them still, and ignores
tokenizer.bpe, where it would fail on a version it does not know in a store that two
versions share.
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
BPE_FILENAME = "tokenizer.bpe"
MAGIC = b"LLMSPM\x00\x00"
VERSION = 2
_HEADER = struct.Struct("<8sIIIIIIII")  # 40 bytes: the arrays after it stay 4-aligned
_HEADER_V1 = struct.Struct("<8sIIIII4x")  # 32 bytes
NO_TOKEN = 0xFFFFFFFF

KIND_SPM = 0
KIND_BYTE_LEVEL = 1

ADDED = 1  # matched whole in the raw text before BPE (an added token in `tokenizers`)
SPECIAL = 2  # left out of decoded text (an added token marked special)
# Byte-level: an ordinary token whose text is not all in GPT-2's byte alphabet, kept as
# its UTF-8 text (the ByteLevel decoder writes such a token as it is).
VERBATIM = 4
# Byte-level: a later token has the same text. `tokenizers` maps the text to the later id
# and has no text for this one, so it decodes to nothing.
SHADOWED = 8
# The merge loop orders ranks as float32 scores: exact below this many.
MAX_MERGES = 1 << 24


@dataclass(frozen=True)
class SpmVocab:
    """A vocabulary to write: texts as the tokenizer spells them, one score and flag each."""

    tokens: list[str]
    scores: list[float]
    flags: list[int]
    unk_id: int | None


@dataclass(frozen=True)
class BpeVocab:
    """A byte-level vocabulary to write: each token's bytes as the blob holds them (see
    the module's doc), its flags, the token of each byte, and the merges by rank."""

    texts: list[bytes]
    flags: list[int]
    byte_ids: list[int]
    merges: list[tuple[int, int, int]]
    split: int


@dataclass(frozen=True)
class SpmLayout:
    """A read file: its bytes and where each array starts in them (None: not of its kind)."""

    data: bytearray
    kind: int
    n: int
    unk_id: int | None
    offsets_at: int
    scores_at: int | None
    byte_ids_at: int | None
    merges_at: int | None
    n_merges: int
    split: int
    flags_at: int
    blob_at: int


def write_spm(vocab: SpmVocab | BpeVocab, path: Path) -> None:
    """Write `vocab` to `path` atomically (see `filename_of`)."""
    if isinstance(vocab, SpmVocab):
        kind, unk, merges, split = KIND_SPM, vocab.unk_id, [], 0
        texts = [t.encode("utf-8", "surrogatepass") for t in vocab.tokens]
        arrays = [np.asarray(vocab.scores, dtype="<f4")]
    else:
        kind, unk, merges, split = KIND_BYTE_LEVEL, None, vocab.merges, vocab.split
        texts = vocab.texts
        arrays = [np.asarray(vocab.byte_ids, dtype="<u4"), np.asarray(merges, dtype="<u4")]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype="<u4")
    np.cumsum(lengths, out=offsets[1:])
    flags = np.asarray(vocab.flags, dtype=np.uint8)
    body = b"".join([offsets.tobytes(), *(a.tobytes() for a in arrays), flags.tobytes()])
    body += b"".join(texts)
    unk_field, crc = NO_TOKEN if unk is None else unk, zlib.crc32(body)
    if kind == KIND_SPM:
        header = _HEADER_V1.pack(MAGIC, 1, len(texts), int(offsets[-1]), unk_field, crc)
    else:
        fields = (kind, len(texts), int(offsets[-1]), unk_field, len(merges), split, crc)
        header = _HEADER.pack(MAGIC, VERSION, *fields)
    with atomic_file(path) as tmp:
        tmp.write_bytes(header + body)


def filename_of(vocab: SpmVocab | BpeVocab) -> str:
    return FILENAME if isinstance(vocab, SpmVocab) else BPE_FILENAME


def read_spm(path: Path) -> SpmLayout:
    """The file's bytes, checked whole (a damaged or truncated file is a ModelFormatError)."""
    data = bytearray(path.read_bytes())

    def bad(why: str) -> ModelFormatError:
        return ModelFormatError(
            f"{path} is damaged ({why}); delete its folder and load the GGUF again"
        )

    if len(data) < _HEADER_V1.size:
        raise bad("shorter than its header")
    magic, version = struct.unpack_from("<8sI", data)
    if magic != MAGIC:
        raise bad("not a native tokenizer's vocabulary")
    if version == 1:
        _, _, n, blob_len, unk, crc = _HEADER_V1.unpack_from(data)
        kind, n_merges, split, offsets_at = KIND_SPM, 0, 0, _HEADER_V1.size
    elif version == VERSION and len(data) >= _HEADER.size:
        _, _, kind, n, blob_len, unk, n_merges, split, crc = _HEADER.unpack_from(data)
        offsets_at = _HEADER.size
    elif version == VERSION:
        raise bad("shorter than its header")
    else:
        raise bad(f"format version {version}, this llmopt reads 1 and {VERSION}")
    if kind not in (KIND_SPM, KIND_BYTE_LEVEL):
        raise bad(f"unknown kind {kind}")
    at = offsets_at + 4 * (n + 1)
    scores_at = byte_ids_at = merges_at = None
    if kind == KIND_SPM:
        scores_at, at = at, at + 4 * n
    else:
        byte_ids_at, merges_at = at, at + 4 * 256
        at = merges_at + 12 * n_merges
    flags_at = at
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
    if kind == KIND_BYTE_LEVEL:
        ids = np.frombuffer(data, dtype="<u4", count=256 + 3 * n_merges, offset=byte_ids_at)
        if n_merges >= MAX_MERGES or np.any((ids >= n) & (ids != NO_TOKEN)):
            raise bad("token ids outside the vocabulary")
        if np.any(ids[256:] == NO_TOKEN):
            raise bad("a merge of no token")
    return SpmLayout(
        data,
        kind,
        n,
        None if unk == NO_TOKEN else unk,
        offsets_at,
        scores_at,
        byte_ids_at,
        merges_at,
        n_merges,
        split,
        flags_at,
        blob_at,
    )
