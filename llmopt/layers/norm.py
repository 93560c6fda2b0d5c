"""RMSNorm, computed in fp32 as the reference implementations do, optionally fused with
the residual add that precedes it (`residual += x` in place, then the norm of the sum).

On the CPU a native kernel (kernels/rmsnorm.c) does both in one call for fp32 and bf16;
elsewhere the same arithmetic runs as torch ops.
"""

from __future__ import annotations

import ctypes
from functools import cache

import torch
from torch import nn

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


@cache
def _kernel():
    """kernels/rmsnorm.c, or None without a C compiler."""
    from llmopt.kernels.build import function

    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    # x, residual, weight, out, rows, dim, eps, bf16
    return function("rmsnorm", [ptr, ptr, ptr, ptr, i32, i32, ctypes.c_float, i32])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (T, D). With residual (T, D): residual += x in place, and the norm is of
        the sum (a pre-norm block's "x = x + sublayer(x); h = norm(x)" in one step)."""
        kernel = _kernel() if x.device.type == "cpu" and x.dtype in _NATIVE_DTYPES else None
        if (
            kernel is not None
            and x.is_contiguous()
            and self.weight.dtype == x.dtype
            and (residual is None or (residual.is_contiguous() and residual.dtype == x.dtype))
        ):
            out = torch.empty_like(x)
            kernel(
                x.data_ptr(), None if residual is None else residual.data_ptr(),
                self.weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1],
                self.eps, int(x.dtype == torch.bfloat16),
            )  # fmt: skip
            return out
        if residual is not None:
            x = residual.add_(x)
        # The variance is taken in fp32 even for bf16/fp16 inputs, and the weight
        # multiplies after the cast back, matching Llama's reference.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
