"""heap.trim gives a big parse's freed memory back: the resident set falls after it."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = """
import sys
from llmopt import heap

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096

blocks = [bytearray(1000) for _ in range(200_000)]  # 200 MB in small heap chunks
keep = blocks[-1]
del blocks
before = rss()
heap.trim()
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_returns_freed_small_allocations() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 100 * 2**20  # most of the 200 MB freed, and now returned
