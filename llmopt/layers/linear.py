"""Dense linear layer (quantized weights are layers/quant_linear.py).

Kernel choice by shape: on CPUs without native bf16/fp16 arithmetic (AVX2: oneDNN
reports no bf16 support) a bf16 GEMM is emulated, several times slower than an fp32
one. One-token decode is memory-bound, so it keeps the half-precision weights (half
the bytes): bf16 weights with fewer than UPCAST_MIN_ROWS rows go through llmopt's
gemv kernel (kernels/gemv_bf16.c: widen and multiply in fp32 at memory speed, where
torch's bf16 matmul does not reach it). From UPCAST_MIN_ROWS rows on, arithmetic
outweighs reading: the weight is widened to fp32 into a reused scratch buffer and the
GEMM runs in fp32, which pays for the copy from a few rows on.

fp32 weights on the CPU are reordered once, at load, into oneDNN's blocked layout
(`prepack`), which multiplies faster than MKL's sgemm on the plain one at decode's
row counts, and the dense copy is dropped. BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import ctypes
import threading
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

UPCAST_MIN_ROWS = 6
PACK_ROWS_HINT = 16  # oneDNN tunes the layout for this many rows; it serves any count
_scratch = threading.local()


@cache
def _cpu_lacks_native_half() -> bool:
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


@cache
def cpu_has_amx() -> bool:
    """Whether oneDNN multiplies bf16 on this CPU's AMX tiles (Sapphire Rapids and later):
    a bf16 GEMM then runs several times faster than an fp32 one."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe()) and not _cpu_lacks_native_half()


@cache
def _gemv_bf16():
    """kernels/gemv_bf16.c, or None without a C compiler."""
    from llmopt.kernels.build import function

    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    # x, x_bf16, M, K, w, N, bias, y, y_bf16
    return function("gemv_bf16", [ptr, i32, i32, i32, ptr, i32, ptr, ptr, i32], i32)


def _fp32_copy(w: torch.Tensor) -> torch.Tensor:
    """w widened to fp32 in a per-thread buffer, valid until the next call."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < w.numel():
        buf = _scratch.buf = torch.empty(w.numel(), dtype=torch.float32)
    out = buf[: w.numel()].view(w.shape)
    out.copy_(w)
    return out


class Linear(nn.Module):
    """y = x W^T (+ b) with W: (out, in).

    No random initialisation (weights always come from a checkpoint): nn.Linear's
    init on the meta device costs about 1.5 s of start-up for a 30-layer model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None  # oneDNN's blocked copy of an fp32 weight

    def prepack(self, keep_dense: bool) -> None:
        """Reorder the fp32 CPU weight for oneDNN; drop the dense copy unless another
        module shares it (a tied lm_head keeps the embedding's)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS_HINT)
        if not keep_dense:
            self.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (M, in) -> (M, out)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        w = self.weight
        if x.shape[0] < UPCAST_MIN_ROWS and self.takes_rowwise(x):
            return self.rowwise(x, x.dtype)
        if (
            x.shape[0] >= UPCAST_MIN_ROWS
            and w.device.type == "cpu"
            and w.dtype in (torch.bfloat16, torch.float16)
            and _cpu_lacks_native_half()
        ):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), _fp32_copy(w), bias).to(x.dtype)
        return F.linear(x, w, self.bias)

    def takes_rowwise(self, x: torch.Tensor) -> bool:
        """Whether `rowwise` runs this weight with x: a bf16 CPU weight, K % 8 == 0."""
        w = self.weight
        return (
            w.dtype == torch.bfloat16
            and x.dtype in (torch.bfloat16, torch.float32)
            and w.device.type == "cpu"
            and x.is_contiguous()
            and w.is_contiguous()
            and w.shape[1] % 8 == 0
            and _gemv_bf16() is not None
        )

    def rowwise(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """x (M, in) -> (M, out) in out_dtype (fp32 or bf16) by gemv_bf16.c, which reads
        W once for all rows and gives each row the same arithmetic whatever M is: a row's
        result never depends on the others in its batch (`takes_rowwise` first)."""
        w, gemv = self.weight, _gemv_bf16()
        assert gemv is not None
        y = torch.empty(x.shape[0], w.shape[0], dtype=out_dtype)
        bias = None if self.bias is None else self.bias.float()
        gemv(
            x.data_ptr(), int(x.dtype == torch.bfloat16), x.shape[0], w.shape[1], w.data_ptr(),
            w.shape[0], None if bias is None else bias.data_ptr(), y.data_ptr(),
            int(out_dtype == torch.bfloat16),
        )  # fmt: skip
        return y


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def prepack_linears(model: nn.Module) -> None:
    """Prepack every Linear of an fp32 CPU model (see the module docstring)."""
    params = [p for m in model.modules() for p in m.parameters(recurse=False)]
    shared = {id(p) for p in params if sum(q is p for q in params) > 1}
    for m in model.modules():
        if isinstance(m, Linear) and m.packed is None:
            m.prepack(keep_dense=id(m.weight) in shared)
