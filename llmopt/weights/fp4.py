"""FP4 weights: MXFP4 and NVFP4, as QuantizedWeights and as GGUF's block bytes.

Both hold e2m1 nibbles (weights/e2m1.py) with a scale per block of weights:

  MXFP4  17 B / 32:  e:e8m0, qs[16]           w = 2^(e - 128) * DOUBLED[q]
  NVFP4  36 B / 64:  d:ue4m3[4], qs[32]       w = t * ue4m3(d_s) / 2 * DOUBLED[q]

with, in MXFP4, byte j of qs holding weight j (low nibble) and j + 16 (high); in NVFP4
four sub-blocks of 16 weights s, each with its scale d_s and bytes 8s .. 8s + 7 of qs,
byte 8s + j holding weight 16s + j (low) and 16s + j + 8 (high); t the tensor's fp32
scale, which GGUF keeps outside the blocks. As a QuantizedWeight: the nibbles as codes
with codebook "e2m1", zero point 12, and per group (32 or 16) the scale of the doubled
values, 2^(e - 128) or t * ue4m3(d) / 2.

llmopt's NVFP4 tensor scales are powers of two: a group's scale is then exactly the
product, and the bytes come back from the QuantizedWeight alone (to_blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from llmopt.weights import e2m1
from llmopt.weights.qweight import QuantizedWeight

FORMATS = ("mxfp4", "nvfp4")
GROUP = {"mxfp4": 32, "nvfp4": 16}  # weights per scale
BLOCK = {"mxfp4": (17, 32), "nvfp4": (36, 64)}  # bytes and weights of a GGUF block
_DOUBLED = torch.tensor(e2m1.DOUBLED, dtype=torch.float32)


def format_of(qw: QuantizedWeight) -> str:
    """The FP4 format a weight is on, by its group; a weight on no FP4 grid refused."""
    fmt = {32: "mxfp4", 16: "nvfp4"}.get(qw.group_size)
    if qw.codebook != "e2m1" or fmt is None or qw.perm is not None:
        raise ValueError("not an FP4 weight (e2m1 codes in groups of 32 or 16, in order)")
    return fmt


def fp4_weight(nibbles: torch.Tensor, scale: torch.Tensor, fmt: str) -> QuantizedWeight:
    """(out, in) nibbles and (out, G) scales of the doubled values -> QuantizedWeight."""
    zero = torch.full_like(scale, float(e2m1.ZERO))
    return QuantizedWeight(nibbles, scale, zero, 4, GROUP[fmt], codebook="e2m1")


def _pair(q: torch.Tensor, half: int) -> torch.Tensor:
    """(nb, 2 * half) nibbles -> (nb, half) bytes: byte j holds nibbles j and j + half."""
    return q[:, :half] | (q[:, half:] << 4)


def _unpair(b: torch.Tensor) -> torch.Tensor:
    """_pair turned around: (nb, half) bytes -> (nb, 2 * half) nibbles."""
    return torch.cat([b & 0x0F, b >> 4], dim=1)


def from_blocks(
    data: torch.Tensor, shape: tuple[int, int], fmt: str, tensor_scale: float = 1.0
) -> QuantizedWeight:
    """A matrix's GGUF block bytes (any shape, row after row) -> QuantizedWeight."""
    out, n = shape
    width, per_block = BLOCK[fmt]
    if n % per_block:
        raise ValueError(f"rows of {n} weights do not fill {fmt.upper()} blocks of {per_block}")
    b = data.reshape(-1, width)
    if fmt == "mxfp4":
        nibbles, scale = _unpair(b[:, 1:]), e2m1.e8m0_scale(b[:, 0])
    else:
        nibbles = _unpair(b[:, 4:].reshape(-1, 8)).view(-1, 64)
        scale = e2m1.ue4m3_value(b[:, :4]) * (tensor_scale / 2)
    return fp4_weight(nibbles.reshape(out, n), scale.reshape(out, -1), fmt)


def _pow2_at_least(x: float) -> float:
    """The least power of two >= x > 0 (1 for x = 0)."""
    if x <= 0:
        return 1.0
    m, e = torch.frexp(torch.tensor(x, dtype=torch.float64))
    return 2.0 ** (int(e) - 1 if float(m) == 0.5 else int(e))


def nvfp4_tensor_scale(qw: QuantizedWeight) -> float:
    """The power of two t whose e4m3 block scales 2 * scale / t are exact and at most 448
    (the least such t); a weight with no such t (another tool's tensor scale) refused."""
    t = _pow2_at_least(2 * float(qw.scale.max()) / 448)
    e2m1.ue4m3_exact(qw.scale * (2 / t))  # refuses a weight with no such t
    return t


def to_blocks(qw: QuantizedWeight) -> tuple[torch.Tensor, float]:
    """QuantizedWeight -> its GGUF block bytes (out, in / per_block * width) and the tensor
    scale (1 for MXFP4)."""
    fmt = format_of(qw)
    out, n = qw.shape
    per_block = BLOCK[fmt][1]
    if n % per_block:
        raise ValueError(f"rows of {n} weights do not fill {fmt.upper()} blocks of {per_block}")
    q = qw.q.reshape(-1, per_block)
    if fmt == "mxfp4":
        e = e2m1.e8m0_of(qw.scale.reshape(-1, 1))
        return torch.cat([e, _pair(q, 16)], dim=1).reshape(out, -1), 1.0
    t = nvfp4_tensor_scale(qw)
    d = e2m1.ue4m3_exact(qw.scale.reshape(-1, 4) * (2 / t))
    qs = _pair(q.reshape(-1, 16), 8).reshape(-1, 32)
    return torch.cat([d, qs], dim=1).reshape(out, -1), t


def _candidates(amax: torch.Tensor, fmt: str, tensor_scale: float) -> list[torch.Tensor]:
    """Scales of the doubled values to try for groups of largest magnitude amax (rows,):
    the format's rule from the maximum first, then one step up and one down."""
    if fmt == "mxfp4":
        e0 = e2m1.mx_exponent(amax)
        return [e2m1.e8m0_scale((e0 + s).clamp(0, 254)) for s in (0, 1, -1)]
    d0 = e2m1.ue4m3_nearest(amax / (6 * tensor_scale))
    codes = [(d0 + s).clamp(0, e2m1.UE4M3_MAX) for s in (0, 1, -1)]
    return [e2m1.ue4m3_value(c) * (tensor_scale / 2) for c in codes]


def _weighted_square(d: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    return (d**2 * importance).sum(dim=1)


def choose_scale(
    w: torch.Tensor,  # (rows, g) one group per row
    fmt: str,
    tensor_scale: float = 1.0,
    importance: torch.Tensor | None = None,  # (g,) or (rows, g): each input's weight
    search: bool = True,
    error: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each group's scale (rows,): of the candidate scales, the one whose rounding error
    d = dequantized - w (rows, g) scores least by error(d) (rows,), by default
    sum importance * d^2 (without search, the format's rule)."""
    cands = _candidates(w.abs().amax(dim=1), fmt, tensor_scale)
    if not search:
        return cands[0]
    imp = torch.ones(w.shape[1], device=w.device) if importance is None else importance.float()
    score = error or partial(_weighted_square, importance=imp)
    best, best_err = cands[0], score(round_to(w, cands[0])[1] - w)
    for s in cands[1:]:
        err = score(round_to(w, s)[1] - w)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def round_to(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (rows, k) on the grid of scale (rows,): the nibbles (uint8) and their values."""
    s = scale.reshape(-1, 1)
    nibbles = e2m1.encode(w / torch.where(s > 0, s, 1.0))
    return nibbles, _DOUBLED.to(w.device)[nibbles.long()] * s


def tensor_scale_for(w: torch.Tensor) -> float:
    """NVFP4's tensor scale for w: the least power of two that keeps every block scale
    within e4m3's 448 (1 for MXFP4's callers to ignore)."""
    return _pow2_at_least(float(w.abs().max()) / (6 * 448))


def quantize_fp4(
    w: torch.Tensor, fmt: str, importance: torch.Tensor | None = None, search: bool = True
) -> QuantizedWeight:
    """Round to nearest on the FP4 grid, w (out, in) float; each group's scale chosen by
    choose_scale. importance (in,): how much each input's error counts (the mean square
    of the input, for the output's error)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown FP4 format '{fmt}'; choose one of {', '.join(FORMATS)}")
    out, n = w.shape
    g = GROUP[fmt]
    if n % g:
        raise ValueError(f"{fmt.upper()} needs rows of a multiple of {g} weights, not {n}")
    w = w.float()
    t = tensor_scale_for(w) if fmt == "nvfp4" else 1.0
    groups = w.reshape(-1, g)
    imp = None if importance is None else importance.float().reshape(-1, g).repeat(out, 1)
    scale = choose_scale(groups, fmt, t, imp, search)
    nibbles, _ = round_to(groups, scale)
    return fp4_weight(nibbles.view(out, n), scale.view(out, -1), fmt)
