"""RMSNorm: the native kernel (fused with the residual add before it) against the torch
arithmetic of the same module, bit for bit in bf16."""

from __future__ import annotations

import pytest
import torch

from llmopt.layers import norm
from llmopt.layers.norm import RMSNorm
from tests.conftest import require_kernel


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7])
def test_native_norm_and_residual_add(dtype, rows) -> None:
    require_kernel(norm._kernel())
    torch.manual_seed(0)
    layer = RMSNorm(576, 1e-5)
    layer.weight.data = torch.randn(576).to(dtype)
    x, residual = torch.randn(rows, 576).to(dtype), torch.randn(rows, 576).to(dtype)
    tol = 0 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(layer(x), _reference(x, layer.weight, 1e-5), rtol=tol, atol=tol)
    summed = residual + x
    out = layer(x, residual)
    torch.testing.assert_close(residual, summed, rtol=0, atol=0)  # added in place
    torch.testing.assert_close(out, _reference(summed, layer.weight, 1e-5), rtol=tol, atol=tol)


def test_torch_path_adds_the_residual_in_place_too() -> None:
    layer = RMSNorm(8, 1e-6).half()  # fp16: not a dtype the kernel takes
    x, residual = torch.randn(2, 8).half(), torch.randn(2, 8).half()
    summed = residual + x
    out = layer(x, residual)
    torch.testing.assert_close(residual, summed)
    torch.testing.assert_close(out, _reference(summed, layer.weight, 1e-6))
