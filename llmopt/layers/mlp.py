"""Gated feed-forward blocks: SwiGLU (Llama family, Qwen) and GeGLU (Gemma)."""

from __future__ import annotations

import ctypes
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.layers.linear import Linear

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


@cache
def _kernel(name: str):
    """kernels/silu_mul.c or gelu_mul.c, or None without a C compiler."""
    from llmopt.kernels.build import function

    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    return function(name, [ptr, ptr, i32, i32, i32])  # gu, a, rows, I, bf16


class SwiGLU(nn.Module):
    activation_kernel = "silu_mul"  # the native activation (the native decode step's too)

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        # gate and up fused into one (2I, hidden) weight: one matmul instead of two.
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # (T, 2I): gate, then up
        native = gu.device.type == "cpu" and gu.dtype in _NATIVE_DTYPES
        kernel = _kernel(self.activation_kernel) if native else None
        if kernel is not None and gu.is_contiguous():
            # The native decode step's own activation (kernels/silu_mul.c, gelu_mul.c):
            # a row's values do not depend on which path its step takes.
            a = gu.new_empty(*gu.shape[:-1], self.intermediate)
            kernel(gu.data_ptr(), a.data_ptr(), gu.numel() // gu.shape[-1], self.intermediate,
                   int(gu.dtype == torch.bfloat16))  # fmt: skip
            return self.down_proj(a)
        gate, up = gu.split(self.intermediate, dim=-1)  # each (T, I)
        return self.down_proj(self.activation(gate) * up)

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)


class GeGLU(SwiGLU):
    """The gated block with GELU (tanh approximation) on the gate: Gemma's MLP."""

    activation_kernel = "gelu_mul"

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")
