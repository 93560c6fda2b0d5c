"""GGML tensors dequantized to fp32 with vectorised torch ops: the plain types (F32,
F16, BF16) and every block type the int kernels run (weights/gguf_blocks.py, which
also keeps them as they are); the rest fall back to `gguf.quants.dequantize` (numpy,
about 10x slower)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from llmopt.weights import gguf_blocks
from llmopt.weights.ggml_types import GGMLType as Q
from llmopt.weights.qweight import QuantizedWeight


def _tensor(data: np.ndarray) -> torch.Tensor:
    # The reader's arrays are read-only memory maps; we only ever read them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(data.view(np.uint8))).reshape(-1)


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """data: the tensor's bytes as read from the file; shape: its logical shape."""
    plain = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    if qtype in plain:
        return _tensor(data).view(plain[qtype]).reshape(shape).float()
    if qtype in gguf_blocks.BLOCKS:
        codes, scale, offset = gguf_blocks.decode(_tensor(data), qtype)
        return (scale * codes.float() + offset).reshape(shape)
    from gguf.quants import dequantize as slow_dequantize

    return torch.from_numpy(slow_dequantize(data, qtype)).reshape(shape).float()


def quantized_weight(
    data: np.ndarray | Callable[[int, int], np.ndarray], qtype: Q, shape: tuple[int, int]
) -> QuantizedWeight:
    """A matrix (out, in) of a type the int kernels run, as the file stores it: from its
    bytes, or from read(start, size), which gives them a few MB at a time."""
    if isinstance(data, np.ndarray):
        whole = data.view(np.uint8).reshape(-1)
        return gguf_blocks.quantized_weight(lambda a, n: _tensor(whole[a : a + n]), qtype, shape)
    read = data
    return gguf_blocks.quantized_weight(lambda a, n: _tensor(read(a, n)), qtype, shape)
