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
def _kernel():
    """kernels/glu_mul.c, or None without a C compiler."""
    from llmopt.kernels.build import function

    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    return function("glu_mul", [ptr, ptr, i32, i32, i32, i32])  # gu, a, rows, I, bf16, gelu


class SwiGLU(nn.Module):
    gelu = False  # the gate's activation: SiLU (GELU in GeGLU), in kernels/glu_mul.c

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        # gate and up fused into one (2I, hidden) weight: one matmul instead of two.
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up_proj(x)  # (T, 2I): gate, then up
        native = gu.device.type == "cpu" and gu.dtype in _NATIVE_DTYPES
        kernel = _kernel() if native else None
        if kernel is not None and gu.is_contiguous():
            # The native decode step's own activation (kernels/glu_mul.c): a row's
            # values do not depend on which path its step takes.
            a = gu.new_empty(*gu.shape[:-1], self.intermediate)
            kernel(gu.data_ptr(), a.data_ptr(), gu.numel() // gu.shape[-1], self.intermediate,
                   int(gu.dtype == torch.bfloat16), int(self.gelu))  # fmt: skip
            return self.down_proj(a)
        gate, up = gu.split(self.intermediate, dim=-1)  # each (T, I)
        return self.down_proj(self.activation(gate) * up)

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)


class GeGLU(SwiGLU):
    """The gated block with GELU (tanh approximation) on the gate: Gemma's MLP."""

    gelu = True

    @staticmethod
    def activation(gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")
