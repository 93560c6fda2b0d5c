"""Texts that tell tokenizers apart, and the check that a native tokenizer gives its
reference's ids and text on them (tests/test_spm_tokenizer.py, test_bpe_tokenizer.py)."""

from __future__ import annotations

import inspect
import json
import pydoc_data.topics
import time
from typing import Protocol


def texts(*own: str) -> list[str]:
    """Empty and whitespace texts, then a vocabulary's `own` (its special tokens and
    scripts), then Python source and a few KB of English prose."""
    topics = list(pydoc_data.topics.topics.values())
    return [
        "",
        " ",
        "Hello world",
        "  leading and trailing  ",
        " " * 77,  # runs of spaces are tokens of their own in some vocabularies
        "\n\n\tx\t\t y  \n\r\n",
        "\t" * 40 + "\n" * 40,
        *own,
        inspect.getsource(json.decoder),
        *(t[:3000] for t in topics[::9]),
    ]


class Codec(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def assert_same_ids_and_text(native: Codec, reference: Codec, cases: list[str]) -> None:
    for text in cases:
        ids = native.encode(text)
        assert ids == reference.encode(text), text[:60]
        assert native.decode(ids) == reference.decode(ids), text[:60]


def assert_100kb_encodes_fast(native: Codec, reference: Codec) -> None:
    """100 KB of prose: the reference's ids, the text back, well under a second (a
    quadratic merge loop takes minutes)."""
    text = " ".join(pydoc_data.topics.topics.values())[:100_000]
    start = time.perf_counter()
    ids = native.encode(text)
    elapsed = time.perf_counter() - start
    assert ids == reference.encode(text)
    assert native.decode(ids) == text
    assert elapsed < 1.0
