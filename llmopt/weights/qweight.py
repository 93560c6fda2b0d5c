"""A weight matrix stored as small integers on a per-group affine grid.

    w[o, i] ~= (q[o, i] - zero[o, g]) * scale[o, g],   g = i // group_size

q is unsigned (0 .. 2^bits - 1) and zero is an integer in the same range, the
convention GPTQ, AWQ and torch's int4 kernels share; or, on a float-zero grid (GGUF's
Q4_1, and `grid(float_zero=True)`), a fraction: -minimum / scale. Our own layout stores
such a grid's minimums; the GPTQ and AWQ layouts cannot (`integer_zero` refuses it).
Symmetric quantization is the case zero = 2^(bits-1): int8 per channel then maps to a
signed int8 with one scale per row, which is what `torch._weight_int8pack_mm` takes.

A codebook makes the codes stand for other integers: with "e2m1" (FP4, weights/fp4.py)
q holds 4-bit e2m1 nibbles and the grid's integer is weights.e2m1.CODES[q] (0..24, zero
point 12), so that w = (CODES[q] - zero) * scale.

Every method (RTN, GPTQ, AWQ) produces one of these; every checkpoint layout (ours,
GPTQ, AWQ) is a packing of one; the runtime linear (layers/quant_linear.py) is built
from one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from llmopt.weights import e2m1

CODEBOOKS = {"e2m1": e2m1.CODES}  # what the codes stand for, by codebook name


class KQuant(NamedTuple):
    """A GGUF K-quant's own factors of its grid (Q4_K, Q5_K, Q6_K): per group
    scale = d * sc and offset = dmin * m, with d and dmin per 256 weights. They say what
    scale and zero say, in the file's bytes: the kernels then read 2.25-2.5 bytes of
    metadata per group instead of fp32's 8."""

    d: torch.Tensor  # (out, in / 256) fp16
    sc: torch.Tensor  # (out, G) int8
    dmin: torch.Tensor  # (out, in / 256) fp16
    m: torch.Tensor  # (out, G) int8

    def rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> KQuant:
        return KQuant(*(fn(t) for t in self))


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # (out, in) uint8, values in [0, 2^bits)
    scale: torch.Tensor  # (out, G) float
    zero: torch.Tensor  # (out, G) float holding integers in [0, 2^bits)
    bits: int
    group_size: int  # in_features for one group per row (per-channel)
    # Optional input-channel order (in,): column j of q holds input channel perm[j].
    # Only GPTQ checkpoints written with act-order need it (their g_idx is not sorted).
    perm: torch.Tensor | None = None
    codebook: str | None = None  # None: q is the integer itself
    # A K-quant's factors of scale and zero, as its file stores them; operations that
    # make another grid (regrid, columns) drop them.
    kquant: KQuant | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def integer_zero(self) -> torch.Tensor:
        """zero as int64, for the layouts that store integers; fractional zeros refused."""
        z = self.zero.long()
        if not torch.equal(z.to(self.zero.dtype), self.zero):
            raise ValueError("this weight has fractional zero points (a GGUF Q4_1 grid)")
        return z

    def grid_codes(self) -> torch.Tensor:
        """(out, in) the integers of the grid: q, or what its codebook maps q to."""
        if self.codebook is None:
            return self.q
        return CODEBOOKS[self.codebook].to(self.q.device)[self.q.long()]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight in the original input-channel order."""
        out, n = self.shape
        g = self.group_size
        w = (
            self.grid_codes().float().view(out, n // g, g) - self.zero.float()[..., None]
        ) * self.scale.float()[..., None]
        w = w.view(out, n)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        perm = None if self.perm is None else self.perm.to(device)
        kquant = None if self.kquant is None else self.kquant.rows(lambda t: t.to(device))
        return QuantizedWeight(
            self.q.to(device),
            self.scale.to(device),
            self.zero.to(device),
            self.bits,
            self.group_size,
            perm,
            self.codebook,
            kquant,
        )

    def regrid(self, bits: int, group_size: int) -> QuantizedWeight:
        """The same weights on a grid of more bits (the codes and zeros as they are) and
        smaller groups (each group's scale and zero repeated): what fusing parts stored
        on different grids needs (a GGUF Q4_K_M file's q/k in Q5_0 beside v in Q6_K). A
        codebook's codes become their integers on a grid of more bits."""
        if bits < self.bits or self.group_size % group_size:
            raise ValueError(f"int{self.bits} group {self.group_size} is not on a finer grid")
        r = self.group_size // group_size
        codebook = self.codebook if bits == self.bits else None
        return QuantizedWeight(
            self.q if codebook else self.grid_codes(),
            self.scale.repeat_interleave(r, dim=1),
            self.zero.repeat_interleave(r, dim=1),
            bits,
            group_size,
            self.perm,
            codebook,
            self.kquant if r == 1 else None,  # the same groups: the same factors
        )

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedWeight:
        """The same weight with its output rows rearranged by fn, applied alike to the
        codes (out, in), scales and zeros (out, G)."""
        kquant = None if self.kquant is None else self.kquant.rows(fn)
        return replace(self, q=fn(self.q), scale=fn(self.scale), zero=fn(self.zero), kquant=kquant)

    def columns(self, lo: int, hi: int) -> QuantizedWeight:
        """Input columns lo..hi-1 alone (a rank's share of a row-split linear), cut on
        group boundaries so that no group is re-quantized: (out, hi - lo) codes and
        their groups' scales and zeros, copied (the whole weight can then be freed)."""
        g = self.group_size
        if self.perm is not None:
            raise ValueError(
                "its input channels are permuted (GPTQ act-order), so no range of columns "
                "holds a range of inputs"
            )
        if g == self.shape[1]:  # one group per row: every slice keeps the row's scale
            return replace(self, q=self.q[:, lo:hi].clone(), group_size=hi - lo, kquant=None)
        if lo % g or hi % g:
            raise ValueError(f"columns {lo}..{hi} do not fall on its groups of {g}")
        return replace(
            self,
            q=self.q[:, lo:hi].clone(),
            scale=self.scale[:, lo // g : hi // g].clone(),
            zero=self.zero[:, lo // g : hi // g].clone(),
            kquant=None,
        )

    def split(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Slices along the output dimension (the inverse of `cat`)."""
        parts = zip(
            self.q.split(sizes), self.scale.split(sizes), self.zero.split(sizes), strict=True
        )
        kq = self.kquant
        kparts: list = [None] * len(sizes)
        if kq is not None:
            kparts = list(zip(*(t.split(sizes) for t in kq), strict=True))
        return [
            QuantizedWeight(
                q.contiguous(),
                s.contiguous(),
                z.contiguous(),
                self.bits,
                self.group_size,
                self.perm,
                self.codebook,
                None if k is None else KQuant(*(t.contiguous() for t in k)),
            )
            for (q, s, z), k in zip(parts, kparts, strict=True)
        ]

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack along the output dimension (fusing q/k/v or gate/up)."""
        first = parts[0]
        key = (first.bits, first.group_size, first.shape[1], first.codebook)
        if any((p.bits, p.group_size, p.shape[1], p.codebook) != key for p in parts):
            raise ValueError("fused weights must share bits, group size, input width and codebook")
        if any(p.perm is not None and not torch.equal(p.perm, first.perm) for p in parts):
            raise ValueError("fused weights must share their input-channel order")
        kquants = [p.kquant for p in parts]
        kquant = None
        if all(k is not None for k in kquants):  # every part a K-quant: theirs stacked
            kquant = KQuant(*(torch.cat(ts) for ts in zip(*kquants, strict=True)))
        return QuantizedWeight(
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            first.bits,
            first.group_size,
            first.perm,
            first.codebook,
            kquant,
        )


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {in_features}")


def grid(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    wmin: torch.Tensor | None = None,
    wmax: torch.Tensor | None = None,
    float_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of one group per row. w: (rows, g) -> scale, zero: (rows,).

    wmin/wmax override the group's range (AWQ's clipping search shrinks it).
    float_zero (asymmetric only): the grid's low end at the group's minimum in fp16, as
    GGUF's Q4_1 and Q4_K hold it, rather than at an integer zero point, which shifts the
    grid by up to half a step and clips that much of one end; the zero is then
    fractional, -minimum / scale, and a checkpoint stores the minimum (fp16). Its range
    need not hold 0 (Q4_1's does not).
    """
    maxq = 2**bits - 1
    float_zero = float_zero and not sym
    lo = w.amin(dim=1) if wmin is None else wmin
    hi = w.amax(dim=1) if wmax is None else wmax
    if not float_zero:  # an integer zero point: the grid holds 0 exactly
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if sym:
        half = 2 ** (bits - 1)
        scale = torch.maximum(-lo, hi) / (half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale.clamp(min=1e-12))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows
    # Checkpoints store scales in fp16: round now, so that every method optimises
    # against the grid that will actually be stored.
    scale = scale.half().float()
    if float_zero:
        return scale, -lo.half().float() / scale  # the minimum as fp16 will hold it
    return scale, zero.clamp(0, maxq)


def quantize_to(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Round w (rows, g) onto the grid of scale/zero (rows,) or (rows, 1): uint8 (rows, g).
    A fractional zero's fraction is rounded with w; an integer one is added after (the
    same codes as round(w / scale + zero) but at exact ties)."""
    scale = scale.reshape(-1, 1)
    zero = zero.reshape(-1, 1)
    whole = zero.round()
    codes = torch.round(w / scale + (zero - whole)) + whole
    return torch.clamp(codes, 0, 2**bits - 1).to(torch.uint8)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, float_zero: bool = False
) -> QuantizedWeight:
    """Round to nearest on a min/max grid per group (grid's float_zero). w: (out, in)."""
    out, n = w.shape
    check_group_size(n, group_size)
    groups = w.float().reshape(out * (n // group_size), group_size)
    scale, zero = grid(groups, bits, sym, float_zero=float_zero)
    q = quantize_to(groups, scale, zero, bits).view(out, n)
    return QuantizedWeight(q, scale.view(out, -1), zero.view(out, -1), bits, group_size)
