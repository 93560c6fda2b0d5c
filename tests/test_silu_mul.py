"""SwiGLU's activation kernel (kernels/silu_mul.c) against torch: a = silu(g) * u."""

from __future__ import annotations

import pytest
import torch

from llmopt.layers.mlp import _kernel
from tests.conftest import require_kernel


def _silu_mul(gu: torch.Tensor, inter: int) -> torch.Tensor:
    kernel = require_kernel(_kernel())
    a = gu.new_empty(gu.shape[0], inter)
    kernel(gu.data_ptr(), a.data_ptr(), gu.shape[0], inter, int(gu.dtype == torch.bfloat16))
    return a


@pytest.mark.parametrize("inter", [1536, 1000])  # 1000: a partial vector at the end
def test_fp32_matches_torch(inter: int) -> None:
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(5, 2 * inter, generator=g) * 4
    gu[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-8, -90.0])  # edges of e^-|g|
    gate, up = gu.double().split(inter, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    got = _silu_mul(gu, inter)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-30)
    # rows are independent: a row alone gives the same bits
    assert torch.equal(_silu_mul(gu[3:4].clone(), inter), got[3:4])


def test_bf16_rounds_as_torch_does() -> None:
    g = torch.Generator().manual_seed(1)
    gu = (torch.randn(3, 2 * 256, generator=g) * 3).bfloat16()
    gate, up = gu.split(256, dim=-1)
    want = torch.nn.functional.silu(gate) * up  # torch in bf16: silu rounded, then product
    torch.testing.assert_close(_silu_mul(gu, 256), want, rtol=1e-2, atol=1e-3)
