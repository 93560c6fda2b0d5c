"""Dequantize GGML tensor blocks to fp32 with vectorised torch ops.

The `gguf` package does this in numpy for every type; the common types here
(F32, F16, BF16, Q8_0, Q4_0, Q4_1) are done in torch, about 10x faster, and the
rest fall back to `gguf.quants.dequantize`.

Block layouts (32 weights a block, little-endian):
  Q8_0: d:f16, q:int8[32]                  w = d * q
  Q4_0: d:f16, qs:u8[16]                   w = d * (nibble - 8)
  Q4_1: d:f16, m:f16, qs:u8[16]            w = d * nibble + m
with the low nibbles of qs holding weights 0..15 and the high nibbles 16..31.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q


def _tensor(data: np.ndarray) -> torch.Tensor:
    # The reader's arrays are read-only memory maps; we only ever read them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(data))


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """data: raw tensor as read from the file; shape: the logical (rows, cols) shape."""
    if qtype == Q.F32:
        return _tensor(data).reshape(shape).float()
    if qtype == Q.F16:
        return _tensor(data).reshape(shape).float()
    raw = _tensor(data.view(np.uint8)).reshape(-1)
    if qtype == Q.BF16:
        return raw.view(torch.bfloat16).reshape(shape).float()
    if qtype == Q.Q8_0:
        blocks = raw.view(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()  # (nb, 1)
        q = blocks[:, 2:].contiguous().view(torch.int8).float()  # (nb, 32)
        return (d * q).reshape(shape)
    if qtype in (Q.Q4_0, Q.Q4_1):
        width = 18 if qtype == Q.Q4_0 else 20
        blocks = raw.view(-1, width)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        qs = blocks[:, width - 16 :]
        nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # (nb, 32)
        if qtype == Q.Q4_0:
            return (d * (nibbles - 8)).reshape(shape)
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        return (d * nibbles + m).reshape(shape)
    from gguf.quants import dequantize as slow_dequantize

    return torch.from_numpy(slow_dequantize(data, qtype)).reshape(shape).float()
