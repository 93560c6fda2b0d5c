"""Binding for qgemv.c: weight-only int4/int5/int6/int8 (and FP4, 4-bit codes through the
e2m1 table) times a few rows of activations on the CPU, with the activations quantized to
int8 per 64 inputs (see the C source for the arithmetic and the error it adds). Layout
helpers for its int4 packing live here too.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import torch

CHUNK = 64  # inputs per activation scale and per int4 chunk (QB)


def supports(bits: int, in_features: int, group_size: int) -> bool:
    """Whether the kernel takes this weight shape."""
    return (
        bits in (4, 5, 6, 8)
        and in_features % CHUNK == 0
        and in_features % group_size == 0
        and (group_size in (16, 32) or group_size % CHUNK == 0)
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (N, K / 2) bytes: per 64 inputs, byte j holds input j
    (low nibble) and input j + 32 (high)."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n, k // CHUNK, 2, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def block_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, G) per-group metadata (scales, offsets or zero points) -> the kernel's
    (ceil(N / 8), G, 8), zero-padded: the 8 rows of W a block computes read a group's
    values with one vector load."""
    n, g = t.shape
    padded = torch.zeros(-(-n // 8) * 8, g, dtype=t.dtype)
    padded[:n] = t
    return padded.view(-1, 8, g).transpose(1, 2).contiguous()


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """pack_int4 turned around: (N, K / 2) bytes -> (N, K) uint8 codes."""
    n, half = w.shape
    v = w.view(n, half // 32, 1, 32)
    return torch.cat([v & 0x0F, v >> 4], dim=2).reshape(n, 2 * half)


_BIT = 1 << torch.arange(8, dtype=torch.uint8)  # bit j of a byte


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) codes in 0 .. 2^bits - 1, bits 4 to 6 -> (N, bits K / 8) bytes: per 64
    inputs, pack_int4's 32 bytes of the low 4 bits, then for each higher bit 8 bytes
    holding input j's bit as bit j (little-endian)."""
    n, k = q.shape
    q = q.to(torch.uint8)
    if q.numel() and int(q.max()) >= 1 << bits:
        raise ValueError(f"{bits}-bit codes must be below {1 << bits}")
    chunks = [pack_int4(q & 0x0F).view(n, k // CHUNK, 32)]
    for b in range(4, bits):  # a plane per higher bit
        plane = ((q >> b) & 1).view(n, k // CHUNK, 8, 8)
        chunks.append((plane * _BIT).sum(-1, dtype=torch.uint8))
    return torch.cat(chunks, dim=2).reshape(n, k * bits // 8)


def unpack_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_codes turned around: (N, bits K / 8) bytes -> (N, K) uint8 codes."""
    n = w.shape[0]
    v = w.view(n, -1, 8 * bits)  # the 64-input chunks
    q = unpack_int4(v[..., :32].reshape(n, -1))
    for b in range(4, bits):
        plane = v[..., 32 + 8 * (b - 4) : 40 + 8 * (b - 4), None]  # (N, chunks, 8, 1)
        q |= ((plane & _BIT) != 0).to(torch.uint8).reshape(n, -1) << b
    return q


# The kernels' forms of scale and offset (qgemv.c's META_*), by the dtypes of the two.
_META_FORMS = {
    (torch.float32, torch.float32): 0,  # fp32 scales, blocked fp32 offsets
    (torch.float16, torch.float16): 1,  # both in fp16 (a GGUF file's own numbers)
    (torch.float16, torch.uint8): 2,  # fp16 scales, integer zero points
    (torch.int8, torch.float16): 3,  # a K-quant's sub-scales and super-block factors
}
META_K = 3
K_SUPER = 256  # weights of a K-quant super-block
# What a 4-bit code stands for (qgemv.c's CODEBOOK_*): itself, or an e2m1 value.
_CODEBOOKS = {None: 0, "e2m1": 1}


class Operands(NamedTuple):
    """One quantized weight as the kernels take it: w = scale * q (or q - 128) + offset,
    the offset given as numbers or, for integer grids, by zero points (kernel_metadata).
    Scales and offsets in block_rows' layout. With codebook "e2m1" the 4-bit codes are
    FP4 values, q = weights.e2m1.CODES[nibble]."""

    w: torch.Tensor  # (N, K bits / 8) pack_codes bytes, or (N, K) int8 holding q - 128
    bits: int
    scale: torch.Tensor  # (ceil(N / 8), G, 8) fp32, or fp16
    offset: torch.Tensor  # the same in scale's dtype, or uint8 zero points
    group_size: int
    codebook: str | None = None

    def pointers(self) -> tuple:
        """(w, bits, scale, offset, group, meta, codebook) as the C functions take them."""
        if self.codebook not in _CODEBOOKS or (self.codebook and self.bits != 4):
            raise ValueError(f"qgemv has no codebook {self.codebook} for int{self.bits}")
        meta = _META_FORMS.get((self.scale.dtype, self.offset.dtype))
        if meta is None:
            raise ValueError("qgemv takes fp32 or fp16 scales and offsets, or uint8 zeros")
        n, k = self.w.shape[0], self.w.shape[1] * 8 // self.bits
        if not supports(self.bits, k, self.group_size) or (
            meta == META_K and (k % K_SUPER or K_SUPER % self.group_size)
        ):
            raise self.refused(k)
        blocks, groups = -(-n // 8), k // self.group_size
        blocked = (blocks, groups, 8), (blocks, groups, 8)
        if meta == META_K:
            blocked = (blocks, groups, 2, 8), (blocks, k // K_SUPER, 2, 8)
        if (self.scale.shape, self.offset.shape) != blocked:
            raise ValueError("qgemv takes its scales and offsets in block_rows' layout")
        o = self
        ptrs = (o.w.data_ptr(), o.bits, o.scale.data_ptr(), o.offset.data_ptr(), o.group_size)
        return (*ptrs, meta, _CODEBOOKS[self.codebook])

    def refused(self, k: int) -> ValueError:
        n = self.w.shape[0]
        return ValueError(f"qgemv does not take int{self.bits} {n}x{k} group {self.group_size}")


def kernel_metadata(
    scale: torch.Tensor,  # (N, G) fp32
    zero: torch.Tensor,  # (N, G) float: w = (q - zero) * scale
    bits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and offsets decode reads (block_rows' layout), in the fewest bytes
    that give the same weights: fp16 scales and uint8 zero points where the grid is fp16
    scales and integer zeros (every GPTQ, AWQ and RTN grid: int4 group 32 then reads 19
    bytes per 32 weights, with fp32 metadata 24); else fp16 scales and offsets where
    those are fp16 numbers (a GGUF Q4_1 file's block scales and minimums: 20); else
    fp32. The offsets are for the kernel's codes: int8 is stored as q - 128."""
    s16 = scale.half()
    exact_scale = torch.equal(s16.float(), scale)
    if exact_scale and torch.equal(zero, zero.round()) and zero.min() >= 0 and zero.max() <= 255:
        return block_rows(s16), block_rows(zero.to(torch.uint8))
    base = 128 if bits == 8 else 0
    offset = (base - zero.float()) * scale
    o16 = offset.half()
    if exact_scale and torch.allclose(o16.float(), offset, rtol=2**-20, atol=0.0):
        return block_rows(s16), block_rows(o16)
    return block_rows(scale.float()), block_rows(offset)


def kquant_metadata(
    d: torch.Tensor,  # (N, K / 256) fp16
    sc: torch.Tensor,  # (N, G) int8
    dmin: torch.Tensor,  # (N, K / 256) fp16
    m: torch.Tensor,  # (N, G) int8
) -> tuple[torch.Tensor, torch.Tensor]:
    """A K-quant's own factors (scale = d * sc, offset = dmin * m per group) as the
    kernels' META_K operands: (ceil(N / 8), G, 2, 8) int8 sub-scales and sub-minimums,
    and (ceil(N / 8), K / 256, 2, 8) fp16 super-block factors."""
    n = sc.shape[0]

    def pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (N, X) twice
        x = a.shape[1]
        return block_rows(torch.stack([a, b], dim=2).reshape(n, 2 * x)).view(-1, x, 2, 8)

    return pairs(sc, m), pairs(d, dmin)


def metadata_rows(
    scale: torch.Tensor, offset: torch.Tensor, ids: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `ids` (T,) of a weight's scales and offsets in fp32, (T, G) each, from the
    kernels' operands in any form (a quantized embedding's lookups): the offsets for
    the kernels' codes, as qgemv makes them (int8 stored as q - 128)."""
    block, lane = ids // 8, ids % 8  # block_rows' layout: (N / 8, G, [2,] 8)
    base = 128.0 if bits == 8 else 0.0
    if scale.dtype == torch.int8:  # META_K: per group sc, m; per super-block d, dmin
        sub = scale[block, :, :, lane].float()  # (T, G, 2)
        sup = offset[block, :, :, lane].float()  # (T, K / 256, 2)
        sup = sup.repeat_interleave(sub.shape[1] // sup.shape[1], dim=1)
        s = sup[..., 0] * sub[..., 0]
        return s, sup[..., 1] * sub[..., 1] + base * s
    s, o = scale[block, :, lane].float(), offset[block, :, lane]
    if o.dtype == torch.uint8:  # zero points: the offset as qgemv makes it
        return s, s * (base - o.float())
    return s, o.float()


class QGemv:
    def __init__(self, fn, dequant_fn, amx: bool) -> None:  # the C functions, declared
        self.fn = fn
        self.dequant_fn = dequant_fn
        # Calls of several rows run on AMX tiles (qgemm_amx.c): then the kernel beats a
        # dequantize-and-GEMM at every row count.
        self.amx = amx

    def __call__(
        self,
        x: torch.Tensor,  # (M, K) bf16 or fp32
        weight: Operands,
        bias: torch.Tensor | None = None,  # (N,) fp32
        perm: torch.Tensor | None = None,  # (K,): W's column k multiplies x[:, perm[k]]
    ) -> torch.Tensor:  # (M, N) in x's dtype
        return self.bind(weight, bias, perm)(x)

    def bind(
        self,
        weight: Operands,
        bias: torch.Tensor | None = None,
        perm: torch.Tensor | None = None,
    ) -> Callable[..., torch.Tensor]:
        """`x -> self(x, weight, bias, perm)` with the weight's pointers resolved once:
        decode calls each linear every step, and the per-call Python is a good part of a
        small matrix's time. The closure keeps the tensors alive (and must not outlive a
        move of them to another device: QuantLinear never moves its buffers)."""
        n, fn = weight.w.shape[0], self.fn
        if perm is not None:
            perm = perm.to(torch.int64).contiguous()  # gathered as the kernel reads x
        head = None if perm is None else perm.data_ptr()
        tail = (*weight.pointers(), n, None if bias is None else bias.data_ptr())
        keep = (weight, bias, perm)  # the tensors behind head's and tail's pointers

        def call(
            x: torch.Tensor, out_dtype: torch.dtype | None = None, _keep: tuple = keep
        ) -> torch.Tensor:  # y in out_dtype (bf16 or fp32; default: x's)
            x = x.contiguous()
            m, k = x.shape
            y = torch.empty(m, n, dtype=out_dtype or x.dtype)
            x_bf16, y_bf16 = int(x.dtype == torch.bfloat16), int(y.dtype == torch.bfloat16)
            if fn(x.data_ptr(), x_bf16, m, k, head, *tail, y.data_ptr(), y_bf16) != 0:
                raise weight.refused(k)
            return y

        return call

    def dequantize(self, weight: Operands, out: torch.Tensor) -> torch.Tensor:
        """The dense weight, written into out (N, K) fp32 or bf16 in one pass."""
        n, k = out.shape
        bf16 = out.dtype == torch.bfloat16
        if (
            not out.is_contiguous()
            or out.dtype not in (torch.float32, torch.bfloat16)
            or self.dequant_fn(*weight.pointers(), n, k, out.data_ptr(), int(bf16))
        ):
            raise weight.refused(k)
        return out


@cache
def load(emulate_amx: bool = False, avx2: bool = False) -> QGemv | None:
    """The kernel, or None without a C compiler. Builds for testing: emulate_amx, whose
    AMX path (qgemm_amx.c) runs on AMX tiles emulated in C (amx_emulated.h), on any CPU
    with AVX-512 (slow); avx2, which keeps to the AVX2 blocks where the CPU has AVX-512
    VNNI (what a CPU without it runs)."""
    from llmopt.kernels.build import function

    defines = ("LLMOPT_AMX_EMULATED",) if emulate_amx else ()
    defines += ("LLMOPT_QGEMV_AVX2",) if avx2 else ()
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    # x, x_bf16, M, K, perm, w, bits, scale, offset, group, meta, codebook, N, bias, y, y_bf16
    argtypes = [ptr, i32, i32, i32, ptr, ptr, i32, ptr, ptr, i32, i32, i32, i32, ptr, ptr, i32]
    fn = function("qgemv", argtypes, i32, defines=defines)
    # w, bits, scale, offset, group, meta, codebook, N, K, out, out_bf16
    dequant_argtypes = [ptr, i32, ptr, ptr, i32, i32, i32, i32, i32, ptr, i32]
    dequant_fn = function("qgemv", dequant_argtypes, i32, "qdequant", defines)
    amx_fn = function("qgemv", [], i32, "qgemv_amx", defines)
    if fn is None or dequant_fn is None or amx_fn is None:
        return None
    return QGemv(fn, dequant_fn, bool(amx_fn()))
