"""The memory a server's models may hold together, and what one model takes: its
weights plus its KV cache.

Before a model's first load its weights are taken to be its files' size (exact for
weights that run as stored; a GGUF expanded to bf16 or fp32 takes more, and a model
converted to bf16 on load less); from its first load on, its engine's measured bytes
count. Its KV cache is as big as --kv-cache-memory says; without it, a server that
keeps a budget gives each model KV_SHARE of the budget, so that the size is known
before the load (the engine's own default depends on the memory free at that moment).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llmopt.engine.config import EngineConfig

CPU_BUDGET_FRACTION = 0.5  # of the machine's RAM
GPU_BUDGET_FRACTION = 0.9  # of the GPU's memory
KV_SHARE = 0.1  # of the budget: a model's KV cache when --kv-cache-memory is not given


def default_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1] * GPU_BUDGET_FRACTION)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * CPU_BUDGET_FRACTION)


def with_kv_size(config: EngineConfig, budget_bytes: int) -> EngineConfig:
    """The config with its KV cache's size fixed (KV_SHARE of the budget if not given)."""
    if config.kv_cache_memory is not None:
        return config
    return config.replace(kv_cache_memory=budget_bytes * KV_SHARE / 1e9)


def _file_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def estimate_bytes(config: EngineConfig) -> int:
    """Weights (files' size) plus KV cache, before the model has been loaded."""
    assert config.model is not None, "the model is resolved to a path before serving"
    kv = int((config.kv_cache_memory or 0) * 1e9)
    return _file_bytes(Path(config.model)) + kv


def fits_at_once(sizes: list[int], budget_bytes: int | None) -> int:
    """How many of the models fit together, the smallest first (at least one)."""
    if budget_bytes is None:
        return len(sizes)
    held = count = 0
    for size in sorted(sizes):
        if held + size > budget_bytes:
            break
        held, count = held + size, count + 1
    return max(1, count)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
