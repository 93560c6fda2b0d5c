"""What every benchmark records about where it ran, and the model it runs on."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console

from llmopt.store.fetch import pull
from llmopt.store.store import Store

BENCH_MODEL = "smollm2-135m-instruct"


def machine_info(threads: int, device: torch.device | None = None) -> dict[str, object]:
    """CPU count, torch build and SIMD level, threads used, the load at the start
    (these machines are shared: a busy neighbour shows up here), and the GPU when the
    run used one."""
    info: dict[str, object] = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"capability {torch.backends.cpu.get_cpu_capability()}",
        "threads": threads,
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_model(threads: int, console: Console) -> tuple[Store, Path]:
    """Set torch's thread count and make sure the benchmark model is in the store."""
    torch.set_num_threads(threads)
    store = Store()
    return store, pull(store, BENCH_MODEL, console)
