"""Engine options shared by the commands that load a model (run, serve)."""

from __future__ import annotations

import typer

DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
DTYPE = typer.Option("auto", "--dtype", help="auto, bfloat16, float16 or float32.")
CTX_SIZE = typer.Option(None, "--ctx-size", help="Cap the context length.")
KV_CACHE_MEMORY = typer.Option(
    None, "--kv-cache-memory", help="GB for the KV cache (default: 10% of free RAM)."
)
THREADS = typer.Option(None, "--threads", help="CPU threads for torch.")
DEQUANTIZE = typer.Option(
    False,
    "--dequantize",
    help="Run a GGUF file's weights dequantized to --dtype (default on CPU: its "
    "Q4_0/Q4_1/Q8_0 blocks as they are, with int kernels).",
)
