"""The gated MLPs' activation kernel (kernels/glu_mul.c) against torch: a = act(g) * u,
with SiLU (SwiGLU) and GELU's tanh form (GeGLU)."""

from __future__ import annotations

import pytest
import torch

from llmopt.layers.mlp import GeGLU, SwiGLU, _kernel
from tests.conftest import require_kernel

BLOCKS = [SwiGLU, GeGLU]


def _act_mul(block: type[SwiGLU], gu: torch.Tensor, inter: int) -> torch.Tensor:
    kernel = require_kernel(_kernel())
    a = gu.new_empty(gu.shape[0], inter)
    bf16 = int(gu.dtype == torch.bfloat16)
    kernel(gu.data_ptr(), a.data_ptr(), gu.shape[0], inter, bf16, int(block.gelu))
    return a


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("inter", [1536, 1000])  # 1000: a partial vector at the end
def test_fp32_matches_torch(block: type[SwiGLU], inter: int) -> None:
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(5, 2 * inter, generator=g) * 4
    gu[0, :6] = torch.tensor([0.0, -0.0, 100.0, -100.0, 1e-8, -90.0])  # edges of e^-|x|
    gate, up = gu.double().split(inter, dim=-1)
    want = block.activation(gate) * up
    got = _act_mul(block, gu, inter)
    # GELU's reference rounds 1 + tanh(y) to 0 below y = -19 (cancellation) where the
    # kernel keeps g * sigmoid(2 y): values under 1e-12 apart there
    atol = 1e-12 if block is GeGLU else 1e-30
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=atol)
    # rows are independent: a row alone gives the same bits
    assert torch.equal(_act_mul(block, gu[3:4].clone(), inter), got[3:4])


@pytest.mark.parametrize("block", BLOCKS)
def test_bf16_rounds_as_torch_does(block: type[SwiGLU]) -> None:
    g = torch.Generator().manual_seed(1)
    gu = (torch.randn(3, 2 * 256, generator=g) * 3).bfloat16()
    gate, up = gu.split(256, dim=-1)
    want = block.activation(gate) * up  # torch in bf16: the activation rounded, then product
    torch.testing.assert_close(_act_mul(block, gu, 256), want, rtol=1e-2, atol=1e-3)
