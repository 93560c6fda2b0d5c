"""Choosing the device and dtype from user options."""

from __future__ import annotations

import torch

from llmopt.errors import UsageError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def check_device_name(name: str) -> None:
    """Refuse a device name that no machine has (whether this one has CUDA is
    resolve_device's to say)."""
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise UsageError(f"unknown device '{name}'; use auto, cpu or cuda")


def check_dtype_name(name: str) -> None:
    if name != "auto" and ALIASES.get(name, name) not in DTYPES:
        raise UsageError(
            f"unknown dtype '{name}'; use auto, {', '.join(DTYPES)} (or bf16/fp16/fp32)"
        )


def resolve_device(name: str) -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
        return torch.device(name)
    return torch.device("cpu")


def resolve_dtype(
    name: str, device: torch.device, batched: bool = False, quantized: bool = False
) -> torch.dtype:
    """auto: bf16, half the bytes to read per token; except for batched serving on a CPU
    without native bf16 arithmetic (AVX2), where bf16 GEMMs are emulated and fp32 with
    oneDNN-prepacked weights runs batches faster (bf16 stays ahead for one stream,
    which reads weights more than it computes); and except for models whose linears
    run quantized on the CPU (`quantized`): their kernels read the same bytes whatever
    the activations' type, so fp32 costs no speed and keeps the residual stream exact
    (bf16 rounding there is enough to change a small model's greedy answers)."""
    if name == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        if device.type == "cpu" and quantized:
            return torch.float32
        if device.type == "cpu" and batched and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.float32
        return torch.bfloat16
    check_dtype_name(name)
    return DTYPES[ALIASES.get(name, name)]
