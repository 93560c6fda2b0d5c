"""A stored model's architecture, read without loading it: a GGUF file's
`general.architecture` from the start of its header, or a folder's config.json
`model_type`. For listings (`llmopt models`), so it must stay cheap: the header's
tokenizer arrays (megabytes) are never read."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

# GGUF value types: fixed sizes in bytes; 8 is a string, 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _u(f: BinaryIO, fmt: str) -> int:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) < size:
        raise ValueError("truncated header")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> bytes:
    return f.read(_u(f, "<Q"))


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype in _FIXED:
        f.seek(_FIXED[vtype], 1)
    elif vtype == _STRING:
        f.seek(_u(f, "<Q"), 1)
    elif vtype == _ARRAY:
        etype, n = _u(f, "<I"), _u(f, "<Q")
        if etype in _FIXED:
            f.seek(_FIXED[etype] * n, 1)
        else:
            for _ in range(n):
                _skip(f, etype)
    else:
        raise ValueError(f"unknown value type {vtype}")


def gguf_architecture(path: Path) -> str | None:
    """`general.architecture` of a GGUF file (version 2 or 3), or None if unreadable."""
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF" or _u(f, "<I") < 2:
                return None
            _u(f, "<Q")  # tensors
            for _ in range(_u(f, "<Q")):  # key-value pairs, the architecture among the first
                key, vtype = _string(f), _u(f, "<I")
                if key == b"general.architecture" and vtype == _STRING:
                    return _string(f).decode("utf-8", "replace")
                _skip(f, vtype)
    except (OSError, ValueError, struct.error):
        return None
    return None


def architecture(path: Path) -> str | None:
    """The architecture of a stored GGUF file or Hugging Face folder."""
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None
    return gguf_architecture(path)
