"""GGML's quantized block types as QuantizedWeights: the codes and the per-group affine
grid each block stores, decoded without rounding anything, so that the int kernels run
a GGUF file's weights as the file holds them.

Every type here is an affine grid over groups of 16 or 32 weights, w = scale * q +
offset; they differ in how the numbers are packed (little-endian; d, dmin, m fp16):

  Q8_0  34 B / 32:  d, q:int8[32]                      w = d * q
  Q4_0  18 B / 32:  d, qs[16]                          w = d * (q - 8)
  Q4_1  20 B / 32:  d, m, qs[16]                       w = d * q + m
  Q5_0  22 B / 32:  d, qh:u32, qs[16]                  w = d * (q - 16)
  Q5_1  24 B / 32:  d, m, qh:u32, qs[16]               w = d * q + m
  Q2_K  84 B / 256: scales[16], qs[64], d, dmin        w = d * sc_j * q - dmin * m_j
  Q3_K 110 B / 256: hmask[32], qs[64], scales[12], d   w = d * (sc_j - 32) * (q - 4)
  Q4_K 144 B / 256: d, dmin, scales[12], qs[128]       w = d * sc_j * q - dmin * m_j
  Q5_K 176 B / 256: d, dmin, scales[12], qh[32], qs[128]   (the same, q of 5 bits)
  Q6_K 210 B / 256: ql[128], qh[64], sc:int8[16], d    w = d * sc_j * (q - 32)
  MXFP4 17 B / 32:  e:e8m0, qs[16]                     w = 2^(e - 128) * (CODES[q] - 12)
  NVFP4 36 B / 64:  d:ue4m3[4], qs[32]                 w = t * ue4m3(d_s) / 2 * (CODES[q] - 12)

The FP4 types' codes are e2m1 nibbles (weights/fp4.py has their layouts), kept as they
are with the "e2m1" codebook; dequantized, they are the integers CODES[q] of
weights/e2m1.py. NVFP4's tensor scale t is not in its blocks: llama.cpp keeps it, where
it is not 1, as a one-element F32 tensor beside the weight (`blk.0.attn_q.scale` beside
`blk.0.attn_q.weight`) and multiplies the matrix product by it.

qs packs two 4-bit codes a byte. In the 32-weight types, byte j holds weight j (low
nibble) and j + 16 (high); bit j of qh is weight j's fifth bit. In the K-quants, each
64 weights take 32 bytes of qs, the low nibbles the first 32 (sub-block 2i), the high
ones the next 32; Q5_K's fifth bit of sub-block j is bit j of qh[l]. The K-quants'
sub-blocks are 32 weights with a 6-bit scale and minimum (12 bytes for 8 pairs), or,
in Q6_K, 16 weights with an int8 scale. Q6_K's codes: 4 low bits in ql, 2 high in qh,
weight l + 32k of each 128 taking ql's low nibble (k = 0, 1) or high (k = 2, 3) of byte
l + 32 (k % 2) and bits 2k .. 2k + 1 of qh[l]. Q2_K and Q3_K have 16-weight sub-blocks:
weight l + 32j of each 128 (n-th) is bits 2j .. 2j + 1 of qs[32n + l]; Q2_K's scale
and minimum are a byte's nibbles; Q3_K's 6-bit scales are the nibbles of scales[0:8]
(sub-block i < 8 the low one of byte i, i >= 8 the high one of byte i - 8) with 2 high
bits from scales[8:12] (sub-block 4s + k: bits 2s .. 2s + 1 of byte 8 + k), and weight
y's third code bit is bit y / 32 of hmask[y % 32]. Their codes (0..3, 0..7) run on the
4-bit kernels: 0.64 bytes a weight against the file's 0.33 and 0.43, where fp32 would
take 4.

A grid's scale d * sc is exact in fp32 (11 bits times 6 or 8); its offset becomes a
zero point, zero = -offset / scale, which the kernels turn back into the offset to fp32
rounding. A group whose scale is 0 (every weight equal to its offset) becomes code 0
at scale 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmopt.weights import e2m1, fp4
from llmopt.weights.ggml_types import GGMLType as Q
from llmopt.weights.qweight import KQuant, QuantizedWeight

# Bytes and weights of one block, and the bits and group of the grid it decodes to.
BLOCKS: dict[Q, tuple[int, int, int, int]] = {
    Q.Q8_0: (34, 32, 8, 32),
    Q.Q4_0: (18, 32, 4, 32),
    Q.Q4_1: (20, 32, 4, 32),
    Q.Q5_0: (22, 32, 5, 32),
    Q.Q5_1: (24, 32, 5, 32),
    Q.Q2_K: (84, 256, 4, 16),
    Q.Q3_K: (110, 256, 4, 16),
    Q.Q4_K: (144, 256, 4, 32),
    Q.Q5_K: (176, 256, 5, 32),
    Q.Q6_K: (210, 256, 6, 16),
    Q.MXFP4: (17, 32, 4, 32),
    Q.NVFP4: (36, 64, 4, 16),
}
FP4_TYPES: dict[Q, str] = {Q.MXFP4: "mxfp4", Q.NVFP4: "nvfp4"}  # weights/fp4.py's names
CODEBOOKS: dict[Q, str] = dict.fromkeys(FP4_TYPES, "e2m1")  # codes that are not integers


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(nb, 2) bytes -> (nb, 1) fp32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 16) bytes of a 32-weight block -> (nb, 32) codes: byte j is weights j, j + 16."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """(nb, 4) bytes of a little-endian u32 -> (nb, 32) bits, bit j for weight j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((qh[:, :, None] >> shifts) & 1).reshape(-1, 32)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nb, 12) packed bytes -> the 8 sub-blocks' 6-bit scales and minimums, (nb, 8)
    each: the first 4 pairs in the low 6 bits of bytes 0-3 and 4-7; the last 4 from the
    nibbles of bytes 8-11 with bytes 0-7's top 2 bits above them."""
    s = s.to(torch.int32)
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=1)
    m = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc, m


def _q6_codes(ql: torch.Tensor, qh: torch.Tensor) -> torch.Tensor:
    """(nb, 128) low and (nb, 64) high bits -> (nb, 256) codes 0..63 (layout above)."""
    ql = ql.reshape(-1, 2, 2, 32)  # (nb, half, byte l or l + 32, l)
    qh = qh.reshape(-1, 2, 1, 32)
    low = torch.stack([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)  # k = 2 nib + b
    high = (qh >> (2 * torch.arange(4, dtype=torch.uint8)).view(1, 1, 4, 1)) & 3
    return (low | (high << 4)).reshape(-1, 256)


K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# The symmetric K-quants' zero points: offset = -zero * scale.
K_ZERO = {Q.Q3_K: 4, Q.Q6_K: 32}


def _q3_scales(s: torch.Tensor) -> torch.Tensor:
    """(nb, 12) packed bytes -> the 16 sub-blocks' 6-bit scales less 32, int8 (layout
    above)."""
    low = torch.cat([s[:, :8] & 15, s[:, :8] >> 4], dim=1)  # (nb, 16)
    shifts = 2 * torch.arange(4, dtype=torch.uint8).view(1, 4, 1)
    high = ((s[:, None, 8:12] >> shifts) & 3).reshape(-1, 16)  # sub-block 4s + k
    return ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8)


def _two_bit_codes(qs: torch.Tensor) -> torch.Tensor:
    """(nb, 64) bytes -> (nb, 256) 2-bit codes: weight 128n + 32j + l is bits 2j, 2j + 1
    of byte 32n + l."""
    shifts = 2 * torch.arange(4, dtype=torch.uint8).view(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def k_factors(data: torch.Tensor, qtype: Q) -> KQuant:
    """A K-quant tensor's raw bytes -> its blocks' factors, one row a block: d and dmin
    (nb, 1) fp16, sc and m (nb, groups a block) int8, with scale = d * sc and offset =
    dmin * m per group. Q4_K/Q5_K's offset is -dmin * m (dmin stored negated); Q6_K's is
    -32 * scale (dmin = -32 d, exact in fp16, and m = sc)."""
    width = BLOCKS[qtype][0]
    b = data.reshape(-1, width)
    if qtype in K_ZERO:  # symmetric: dmin = -zero * d, m = sc
        at, sc = (208, b[:, 192:208].contiguous().view(torch.int8))
        if qtype == Q.Q3_K:
            at, sc = 108, _q3_scales(b[:, 96:108])
        d = b[:, at : at + 2].contiguous().view(torch.float16)
        return KQuant(d, sc, -K_ZERO[qtype] * d, sc)
    if qtype == Q.Q2_K:
        d, dmin = (b[:, a : a + 2].contiguous().view(torch.float16) for a in (80, 82))
        sc = b[:, :16]
        return KQuant(d, (sc & 15).to(torch.int8), -dmin, (sc >> 4).to(torch.int8))
    d, dmin = (b[:, a : a + 2].contiguous().view(torch.float16) for a in (0, 2))
    sc, m = _k_scales(b[:, 4:16])
    return KQuant(d, sc.to(torch.int8), -dmin, m.to(torch.int8))


def decode(
    data: torch.Tensor, qtype: Q, k: KQuant | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tensor's raw bytes -> codes (groups, group) uint8, and the groups' scale and
    offset (groups, 1) fp32, with w = scale * code + offset exactly (NVFP4's tensor
    scale, outside the blocks, not applied). k: a K-quant's factors of these blocks, where
    the caller has them already."""
    width, per_block, _, group = BLOCKS[qtype]
    b = data.reshape(-1, width)
    if qtype in FP4_TYPES:
        qw = fp4.from_blocks(b, (b.shape[0], per_block), FP4_TYPES[qtype])
        codes, scale = qw.grid_codes().reshape(-1, group), qw.scale.reshape(-1, 1)
        return codes, scale, -e2m1.ZERO * scale
    if qtype == Q.Q8_0:  # int8 q as the code q + 128
        d = _f16(b[:, :2])
        return torch.bitwise_xor(b[:, 2:], 0x80), d, -128 * d
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        d, codes = _f16(b[:, :2]), _nibbles(b[:, width - 16 :])
        if qtype in (Q.Q5_0, Q.Q5_1):
            at = 2 if qtype == Q.Q5_0 else 4
            codes = codes | (_fifth_bits(b[:, at : at + 4]) << 4)
        if qtype in (Q.Q4_1, Q.Q5_1):
            return codes, d, _f16(b[:, 2:4])
        return codes, d, -(16 if qtype == Q.Q5_0 else 8) * d
    subs = per_block // group
    k = k_factors(b, qtype) if k is None else k  # the caller's, where it has them
    scale = k.d.float() * k.sc.float()  # (nb, subs)
    # The symmetric ones' in fp32 from the scale: their fp16 dmin (-zero * d) overflows
    # for large d
    zero = K_ZERO.get(qtype)
    offset = -zero * scale if zero else k.dmin.float() * k.m.float()
    if qtype == Q.Q6_K:
        codes = _q6_codes(b[:, :128], b[:, 128:192])
    elif qtype == Q.Q2_K:
        codes = _two_bit_codes(b[:, 16:80])
    elif qtype == Q.Q3_K:
        shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        high = ((b[:, None, :32] >> shifts) & 1).reshape(-1, 256)  # weight 32 b + l
        codes = _two_bit_codes(b[:, 32:96]) | (high << 2)
    else:
        qs = b[:, width - 128 :].reshape(-1, 4, 1, 32)
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, subs, group)
        if qtype == Q.Q5_K:
            bits = (b[:, 16:48, None] >> torch.arange(8, dtype=torch.uint8)) & 1  # (nb, l, j)
            codes = codes | (bits.transpose(1, 2) << 4)
    return codes.reshape(-1, group), scale.view(-1, 1), offset.view(-1, 1)


# Raw bytes decoded at a time: a big matrix (Gemma 3's 168 MB embedding) then never
# has its file bytes and its codes in memory whole at once.
CHUNK_BYTES = 8 << 20


def quantized_weight(
    read: Callable[[int, int], torch.Tensor], qtype: Q, shape: tuple[int, int]
) -> QuantizedWeight:
    """A matrix (out, in) of one of BLOCKS' types, as it is stored (NVFP4's tensor scale
    not applied); read(start, size) gives `size` bytes of it from byte `start`, which are
    decoded a few MB at a time."""
    out, n = shape
    width, per_block, bits, group = BLOCKS[qtype]
    if n % per_block:
        raise ValueError(f"rows of {n} weights do not fill {qtype.name} blocks of {per_block}")
    row_bytes, groups = n // per_block * width, n // group
    q = torch.empty(out, n, dtype=torch.uint8)
    scale, zero = torch.empty(out, groups), torch.empty(out, groups)
    kquant = None
    if qtype in K_TYPES:  # the factors as stored: (out, in / 256) and (out, G)
        supers = n // per_block
        kquant = KQuant(
            torch.empty(out, supers, dtype=torch.float16),
            torch.empty(out, groups, dtype=torch.int8),
            torch.empty(out, supers, dtype=torch.float16),
            torch.empty(out, groups, dtype=torch.int8),
        )
    step = max(1, CHUNK_BYTES // row_bytes)
    for a in range(0, out, step):
        rows = min(step, out - a)
        data = read(a * row_bytes, rows * row_bytes)
        k = None
        if kquant is not None:
            k = k_factors(data, qtype)
            for whole, t in zip(kquant, k, strict=True):
                whole[a : a + rows] = t.reshape(rows, -1)
        if qtype in FP4_TYPES:  # the nibbles as they are, on the e2m1 codebook
            part = fp4.from_blocks(data, (rows, n), FP4_TYPES[qtype])
            q[a : a + rows], scale[a : a + rows] = part.q, part.scale
            zero[a : a + rows] = part.zero
            continue
        codes, s, offset = decode(data, qtype, k)
        flat = (s == 0)[:, 0]  # every weight of the group is its offset: code 0 at scale 1
        codes[flat], s[flat] = 0, 1.0
        q[a : a + rows] = codes.view(rows, n)
        scale[a : a + rows] = s.view(rows, groups)
        zero[a : a + rows] = (-offset / s).view(rows, groups)
    if kquant is not None and not torch.isfinite(kquant.dmin).all():
        kquant = None  # a symmetric type's -zero * d past fp16's range: the fp32 grid alone
    return QuantizedWeight(
        q, scale, zero, bits, group, codebook=CODEBOOKS.get(qtype), kquant=kquant
    )


# The block types a QuantizedWeight can be written as without rounding its codes again:
# groups of ENCODE_GROUP on a 4-bit grid, a symmetric one (zero point 8) for Q4_0, e2m1
# in the FP4 format's own groups for MXFP4 and NVFP4.
ENCODABLE = (Q.Q4_0, Q.Q4_1, Q.MXFP4, Q.NVFP4)
ENCODE_GROUP = 32


def fits(qw: QuantizedWeight, qtype: Q) -> bool:
    """Whether `encode` takes qw as qtype's blocks: its grid is the type's."""
    if qtype not in ENCODABLE or qw.perm is not None or qw.bits != 4:
        return False
    if qtype in FP4_TYPES:
        return qw.codebook == "e2m1" and qw.group_size == fp4.GROUP[FP4_TYPES[qtype]]
    zero_ok = qtype == Q.Q4_1 or bool((qw.zero == 8).all())
    return qw.codebook is None and qw.group_size == ENCODE_GROUP and zero_ok


def encode(qw: QuantizedWeight, qtype: Q) -> tuple[torch.Tensor, float]:
    """qw (out, in) as qtype's blocks, (out, in / 32 * width) bytes, and the tensor scale
    that goes beside them (NVFP4's; else 1): its codes as they are, its scales and Q4_1's
    minimums (-scale * zero) rounded to the fp16 the blocks hold (a relative 2^-11 of the
    scale; a minimum's rounding is under 1% of a step)."""
    if not fits(qw, qtype):
        raise ValueError(f"this weight's grid is not {qtype.name}'s")
    if qtype in FP4_TYPES:
        return fp4.to_blocks(qw)
    q = qw.q.reshape(-1, ENCODE_GROUP)
    qs = q[:, :16] | (q[:, 16:] << 4)  # byte j: weight j low, j + 16 high
    d = qw.scale.reshape(-1, 1).to(torch.float16).view(torch.uint8)  # (nb, 2)
    parts = [d, qs]
    if qtype == Q.Q4_1:
        m = (-qw.scale * qw.zero).reshape(-1, 1).to(torch.float16).view(torch.uint8)
        parts = [d, m, qs]
    return torch.cat(parts, dim=1).reshape(qw.shape[0], -1), 1.0
