"""Where llmopt keeps its files: $LLMOPT_HOME, default ~/.cache/llmopt. On the ground
floor because the model store and the kernel build cache both live under it."""

from __future__ import annotations

import os
from pathlib import Path


def llmopt_home() -> Path:
    return Path(os.environ.get("LLMOPT_HOME") or Path.home() / ".cache" / "llmopt")
