"""GGML tensor blocks: dequantized to fp32 with vectorised torch ops, or, for the
types the int kernels run, kept as a QuantizedWeight.

The `gguf` package dequantizes every type in numpy; the common types here (F32, F16,
BF16, Q8_0, Q4_0, Q4_1) are done in torch, about 10x faster, and the rest fall back
to `gguf.quants.dequantize`.

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

from llmopt.weights.qweight import QuantizedWeight

BLOCK = 32  # weights a block of the types below
# Types whose blocks are one affine grid of 32 weights: bits of their codes.
AFFINE_BITS = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4}


def _tensor(data: np.ndarray) -> torch.Tensor:
    # The reader's arrays are read-only memory maps; we only ever read them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(data))


def _affine_blocks(data: np.ndarray, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q8_0/Q4_0/Q4_1 raw bytes -> codes (nb, 32) uint8, d (nb, 1) and base (nb, 1) fp32
    with w = d * code + base. Every product and the integer bases are exact in fp32."""
    raw = _tensor(data.view(np.uint8)).reshape(-1)
    width = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20}[qtype]
    blocks = raw.view(-1, width)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (nb, 1)
    if qtype == Q.Q8_0:  # int8 q as the unsigned code q + 128
        signed = blocks[:, 2:].contiguous().view(torch.int8)
        return (signed.to(torch.int16) + 128).to(torch.uint8), d, -128 * d
    qs = blocks[:, width - 16 :]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=1)  # (nb, 32)
    if qtype == Q.Q4_0:
        return codes, d, -8 * d
    return codes, d, blocks[:, 2:4].contiguous().view(torch.float16).float()


def dequantize(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> torch.Tensor:
    """data: the tensor's bytes as read from the file; shape: its logical shape."""
    raw = _tensor(data.view(np.uint8)).reshape(-1)
    plain = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    if qtype in plain:
        return raw.view(plain[qtype]).reshape(shape).float()
    if qtype in AFFINE_BITS:
        codes, d, base = _affine_blocks(data, qtype)
        return (d * codes.float() + base).reshape(shape)
    from gguf.quants import dequantize as slow_dequantize

    return torch.from_numpy(slow_dequantize(data, qtype)).reshape(shape).float()


def quantized_weight(data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> QuantizedWeight:
    """A Q8_0/Q4_0/Q4_1 matrix (out, in) as it is: codes, one scale and zero point per 32
    inputs, w = (code - zero) * scale. Q8_0 and Q4_0 have integer zero points (128, 8);
    Q4_1's float minimum m becomes the fractional zero -m / d, which the int kernels
    turn back into the offset (-zero * scale = m, to fp32 rounding)."""
    out, n = shape
    codes, d, base = _affine_blocks(data, qtype)
    flat = d == 0  # a constant block (d = 0, every weight = base): code 0 at scale 1
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.ones_like(d), d)
    zero = -base / scale
    groups = n // BLOCK
    return QuantizedWeight(
        codes.reshape(out, n).contiguous(),
        scale.reshape(out, groups),
        zero.reshape(out, groups),
        AFFINE_BITS[qtype],
        BLOCK,
    )
