"""Hand the heap's freed memory back to the operating system.

glibc's malloc keeps what a process frees in its arenas, and the resident set still
counts it. Parsing a big tokenizer.json (a 262k-token vocabulary with 515k merges)
allocates about three times what the built tokenizer keeps, and decoding weights part
by part leaves freed buffers behind; without a trim the process holds those pages for
good. malloc_trim(0) returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any


@cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim() -> None:
    """Return freed heap pages to the OS; nothing where libc has no malloc_trim (macOS,
    musl)."""
    libc = _libc()
    fn = getattr(libc, "malloc_trim", None) if libc is not None else None
    if fn is not None:
        fn(0)
