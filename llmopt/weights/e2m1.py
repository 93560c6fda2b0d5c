"""FP4 (e2m1) values and the scale formats of the FP4 blocks, in GGUF's conventions.

A nibble is an e2m1 number: bit 3 the sign, bits 0-2 index the magnitudes 0, 0.5, 1,
1.5, 2, 3, 4, 6. GGUF (and llama.cpp) keep them doubled, as the integers DOUBLED, with
the block scale halved to match; the kernels add ZERO to make them unsigned codes 0..24
(CODES) on an integer grid whose zero point is ZERO: w = scale * (CODES[nibble] - ZERO),
scale = the block scale / 2.

Scales: MXFP4 an e8m0 byte per 32 weights, 2^(e - 127) (so scale = 2^(e - 128)); NVFP4
an unsigned e4m3 byte per 16 weights (4 exponent bits, bias 7, 3 mantissa bits,
subnormals, 0x7E = 448 the largest; 0x7F reads as 0, as ggml has it) times one fp32
number per tensor.
"""

from __future__ import annotations

import torch

DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # by nibble
ZERO = 12
CODES = torch.tensor([v + ZERO for v in DOUBLED], dtype=torch.uint8)  # (16,) 0..24
# Halfway points between consecutive doubled magnitudes: a tie rounds to the smaller.
_MIDPOINTS = torch.tensor([0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0])
UE4M3_MAX = 0x7E  # 448, the largest finite unsigned e4m3


def encode(v: torch.Tensor) -> torch.Tensor:
    """Doubled values (w / scale) -> the nearest e2m1 nibbles, uint8 of v's shape: ties
    to the smaller magnitude, past 12 the largest, a value that rounds to 0 positive
    (GGUF's reference quantizer picks the same)."""
    mids = _MIDPOINTS.to(v.device)
    mag = torch.searchsorted(mids, v.abs().float().contiguous())  # midpoints below |v|
    return (mag | ((v < 0) & (mag > 0)).long() << 3).to(torch.uint8)


def e8m0_scale(e: torch.Tensor) -> torch.Tensor:
    """e8m0 bytes -> the scale of the doubled values, 2^(e - 128), fp32 (exact)."""
    return torch.ldexp(torch.ones(e.shape, device=e.device), e.to(torch.int32) - 128)


def e8m0_of(scale: torch.Tensor) -> torch.Tensor:
    """e8m0_scale turned around: powers of two 2^(e - 128) -> bytes e; others refused."""
    mant, exp = torch.frexp(scale.float())
    e = exp.long() + 127  # scale = 0.5 * 2^exp
    if not (torch.all(mant == 0.5) and torch.all((e >= 0) & (e <= 255))):
        raise ValueError("MXFP4 scales are powers of two from 2^-128 to 2^127")
    return e.to(torch.uint8)


def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """The OCP rule for a block of largest magnitude amax: e = floor(log2 amax) - 2 + 127,
    so the block's largest value lands in [4, 8) of e2m1 (values past 6 saturate); 0 for
    an all-zero block. int64, unclamped."""
    _, exp = torch.frexp(amax.float())  # amax = m * 2^exp, m in [0.5, 1)
    return torch.where(amax > 0, exp.long() - 1 - 2 + 127, 0)


def ue4m3_value(b: torch.Tensor) -> torch.Tensor:
    """Unsigned e4m3 bytes -> their values, fp32 (the scale of the plain e2m1 values;
    the doubled values' scale is half of it)."""
    b = b.to(torch.int32)
    exp, man = (b >> 3) & 0xF, (b & 7).float()
    normal = torch.ldexp(1 + man / 8, exp - 7)
    value = torch.where(exp == 0, man * 2.0**-9, normal)
    return torch.where((b == 0) | (b == 0x7F), 0.0, value)


_UE4M3 = ue4m3_value(torch.arange(UE4M3_MAX + 1))  # (127,) the finite values, ascending


def ue4m3_nearest(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> the byte of the nearest unsigned e4m3 value (ties to the larger; past 448
    and below 0 clamped), int64."""
    x, values = x.float().contiguous(), _UE4M3.to(x.device)
    hi = torch.searchsorted(values, x).clamp(max=UE4M3_MAX)  # first value >= x
    lo = (hi - 1).clamp(min=0)
    return torch.where(x - values[lo] < values[hi] - x, lo, hi)


def ue4m3_exact(x: torch.Tensor) -> torch.Tensor:
    """Unsigned e4m3 values -> their bytes, uint8; values e4m3 does not hold refused."""
    b = ue4m3_nearest(x)
    if not torch.equal(_UE4M3.to(x.device)[b], x.float()):
        raise ValueError("NVFP4 block scales must be unsigned e4m3 numbers")
    return b.to(torch.uint8)
