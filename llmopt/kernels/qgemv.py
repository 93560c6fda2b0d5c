"""Binding for qgemv.c: weight-only int4/int8 times a few rows of activations on the
CPU, with the activations quantized to int8 per 64 inputs (see the C source for the
arithmetic and the error it adds). Layout helpers for its int4 packing live here too.
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
        bits in (4, 8)
        and in_features % CHUNK == 0
        and in_features % group_size == 0
        and (group_size == 32 or group_size % CHUNK == 0)
    )


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 -> (N, K / 2) bytes: per 64 inputs, byte j holds input j
    (low nibble) and input j + 32 (high)."""
    n, k = q.shape
    v = q.to(torch.uint8).view(n, k // CHUNK, 2, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def block_offsets(offset: torch.Tensor) -> torch.Tensor:
    """(N, G) per-group offsets -> the kernel's (ceil(N / 8), G, 8), zero-padded: the
    8 rows of W a block computes read a group's offsets with one vector load."""
    n, g = offset.shape
    padded = torch.zeros(-(-n // 8) * 8, g, dtype=torch.float32)
    padded[:n] = offset
    return padded.view(-1, 8, g).transpose(1, 2).contiguous()


def unpack_int4(w: torch.Tensor) -> torch.Tensor:
    """pack_int4 turned around: (N, K / 2) bytes -> (N, K) uint8 codes."""
    n, half = w.shape
    v = w.view(n, half // 32, 1, 32)
    return torch.cat([v & 0x0F, v >> 4], dim=2).reshape(n, 2 * half)


_META_DTYPES = (torch.float32, torch.float16)  # scales and offsets the kernels read


class Operands(NamedTuple):
    """One quantized weight as the kernels take it: w = scale * q (or q - 128) + offset."""

    w: torch.Tensor  # (N, K / 2) pack_int4 bytes, or (N, K) int8 holding q - 128
    bits: int
    scale: torch.Tensor  # (N, G) fp32, or fp16 (see compact_metadata)
    offset: torch.Tensor  # block_offsets of (N, G), in scale's dtype
    group_size: int

    def pointers(self) -> tuple:
        """(w, bits, scale, offset, group, meta16) as the C functions take them."""
        if self.offset.dim() != 3:
            raise ValueError("qgemv takes its offsets in block_offsets' layout")
        meta16 = self.scale.dtype == torch.float16
        if self.offset.dtype != self.scale.dtype or self.scale.dtype not in _META_DTYPES:
            raise ValueError("qgemv takes fp32 or fp16 scales and offsets, both alike")
        o = self
        ptrs = (o.w.data_ptr(), o.bits, o.scale.data_ptr(), o.offset.data_ptr(), o.group_size)
        return (*ptrs, int(meta16))

    def refused(self, k: int) -> ValueError:
        n = self.w.shape[0]
        return ValueError(f"qgemv does not take int{self.bits} {n}x{k} group {self.group_size}")


def compact_metadata(
    scale: torch.Tensor, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scales and (blocked) offsets in fp16 where that changes no value beyond fp32
    rounding (a GGUF file's block scales and minimums are fp16 to begin with: Q4_1 then
    reads 5 bits a weight instead of 6), else as they are. A GPTQ grid's offsets,
    -zero * scale, need more than fp16's 11 bits and stay fp32."""
    s16, o16 = scale.half(), offset.half()
    exact = torch.equal(s16.float(), scale) and torch.allclose(
        o16.float(), offset, rtol=2**-20, atol=0.0
    )
    return (s16, o16) if exact else (scale, offset)


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
    ) -> torch.Tensor:  # (M, N) in x's dtype
        return self.bind(weight, bias)(x)

    def bind(
        self, weight: Operands, bias: torch.Tensor | None = None
    ) -> Callable[..., torch.Tensor]:
        """`x -> self(x, weight, bias)` with the weight's pointers resolved once: decode
        calls each linear every step, and the per-call Python is a good part of a small
        matrix's time. The closure keeps the tensors alive (and must not outlive a move
        of them to another device: QuantLinear never moves its buffers)."""
        n, fn = weight.w.shape[0], self.fn
        tail = (*weight.pointers(), n, None if bias is None else bias.data_ptr())
        keep = (weight, bias)  # the tensors behind tail's pointers

        def call(
            x: torch.Tensor, out_dtype: torch.dtype | None = None, _keep: tuple = keep
        ) -> torch.Tensor:  # y in out_dtype (bf16 or fp32; default: x's)
            x = x.contiguous()
            m, k = x.shape
            y = torch.empty(m, n, dtype=out_dtype or x.dtype)
            x_bf16, y_bf16 = int(x.dtype == torch.bfloat16), int(y.dtype == torch.bfloat16)
            if fn(x.data_ptr(), x_bf16, m, k, *tail, y.data_ptr(), y_bf16) != 0:
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
def load() -> QGemv | None:
    """The kernel, or None without a C compiler."""
    from llmopt.kernels.build import function

    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    # x, x_bf16, M, K, w, bits, scale, offset, group, meta16, N, bias, y, y_bf16
    argtypes = [ptr, i32, i32, i32, ptr, i32, ptr, ptr, i32, i32, i32, ptr, ptr, i32]
    fn = function("qgemv", argtypes, i32)
    # w, bits, scale, offset, group, meta16, N, K, out, out_bf16
    dequant_argtypes = [ptr, i32, ptr, ptr, i32, i32, i32, i32, ptr, i32]
    dequant_fn = function("qgemv", dequant_argtypes, i32, "qdequant")
    amx_fn = function("qgemv", [], i32, "qgemv_amx")
    if fn is None or dequant_fn is None or amx_fn is None:
        return None
    return QGemv(fn, dequant_fn, bool(amx_fn()))
