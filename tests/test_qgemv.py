"""The int4/int8 decode kernel (llmopt/kernels/qgemv.c) against a float64 reference.

Its only approximation is rounding the activations to int8 per 64 inputs, so inputs
that are already integers with 127 in every 64-block go through exactly, and the
result must match to float rounding; ordinary inputs stay within that rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmopt.kernels import qgemv
from llmopt.kernels.qgemv import Operands
from llmopt.layers.quant_linear import QGEMV_MAX_ROWS, QuantLinear, use_decode_arithmetic
from llmopt.quant.qweight import QuantizedWeight, quantize_rtn

KERNEL = qgemv.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="no C compiler")


def _operands(n: int, k: int, bits: int, group: int, seed: int = 0):
    """Random codes and affine terms, the kernel's operands, and the dense weight."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group, generator=g) * 0.01 + 1e-3
    offset = -scale * torch.randint(0, 2**bits, (n, k // group), generator=g).float()
    w = (q.double().view(n, -1, group) * scale[..., None] + offset[..., None]).view(n, k)
    if bits == 4:
        return qgemv.pack_int4(q), scale, qgemv.block_offsets(offset), w
    signed = (q.to(torch.int16) - 128).to(torch.int8)
    return signed, scale, qgemv.block_offsets(offset + 128 * scale), w


CASES = [(4, 32), (4, 64), (4, 128), (8, 64), (8, 32), (8, 192)]


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("rows", [1, 3, 20])  # 20: AMX tiles where the CPU has them
def test_exact_on_integer_activations(bits: int, group: int, rows: int) -> None:
    n, k = 43, 384  # not a multiple of the kernel's 8-row blocks
    w_k, scale, offset, w = _operands(n, k, bits, group)
    bias = torch.randn(n)
    x = torch.randint(-127, 128, (rows, k)).float()
    x[:, ::64] = 127  # every 64-block's scale is exactly 1
    y = KERNEL(x, Operands(w_k, bits, scale, offset, group), bias)
    ref = x.double() @ w.T + bias.double()
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("rows", [2, 17])
def test_bf16_activations_within_int8_rounding(bits: int, group: int, rows: int) -> None:
    n, k = 96, 768
    w_k, scale, offset, w = _operands(n, k, bits, group, seed=1)
    x = torch.randn(rows, k).bfloat16()
    y = KERNEL(x, Operands(w_k, bits, scale, offset, group))
    assert y.dtype == torch.bfloat16
    ref = x.double() @ w.T
    # Rounding each input to max|x|/127 steps: about 0.7% of a Gaussian row's norm.
    assert ((y.double() - ref).norm() / ref.norm()).item() < 0.02


def test_int4_packing_round_trips() -> None:
    q = torch.randint(0, 16, (8, 192), dtype=torch.uint8)
    packed = qgemv.pack_int4(q)
    assert packed.shape == (8, 96)
    assert torch.equal(qgemv.unpack_int4(packed), q)


def test_shapes_it_does_not_take() -> None:
    assert not qgemv.supports(4, 96, 32)  # inputs not a multiple of 64
    assert not qgemv.supports(4, 384, 96)  # a group that straddles 64-input chunks
    assert not qgemv.supports(3, 384, 64)
    w_k, scale, _, _ = _operands(8, 192, 4, 64)
    two = scale[:, :2]  # two groups of 96
    with pytest.raises(ValueError, match="does not take"):
        KERNEL(torch.randn(1, 192), Operands(w_k, 4, two, qgemv.block_offsets(two), 96))
    with pytest.raises(ValueError, match="block_offsets"):  # (N, G) offsets: the wrong layout
        KERNEL(torch.randn(1, 192), Operands(w_k, 4, scale, scale, 64))


def test_rows_are_independent() -> None:
    """A row's result does not depend on the rows beside it: the same numbers whatever
    the other rows hold; without AMX also the same as the row alone (one arithmetic for
    every row count)."""
    w_k, scale, offset, _ = _operands(24, 256, 4, 64)
    x = torch.randn(19, 256)  # more than one 8-row register block, and a partial one
    weight = Operands(w_k, 4, scale, offset, 64)
    whole = KERNEL(x, weight)
    others = torch.cat([x[:5], torch.randn(14, 256)])
    assert torch.equal(KERNEL(others, weight)[:5], whole[:5])
    one_by_one = torch.cat([KERNEL(row[None], weight) for row in x])
    if not KERNEL.amx:
        assert torch.equal(whole, one_by_one)
    torch.testing.assert_close(whole, one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(KERNEL is None or not KERNEL.amx, reason="no AMX on this CPU")
@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("meta16", [False, True])
def test_amx_tiles_agree_with_the_row_kernel(bits: int, group: int, meta16: bool) -> None:
    """From 4 rows on the kernel runs on AMX tiles: the same integer products and terms
    as the row kernel, summed in another order, so equal to float rounding; partial
    tiles of rows of x (37 = 2 x 16 + 5) and of W (43 = 2 x 16 + 11)."""
    w_k, scale, offset, _ = _operands(43, 384, bits, group, seed=8)
    if meta16:
        scale, offset = qgemv.compact_metadata(scale.half().float(), offset.half().float())
    weight, bias = Operands(w_k, bits, scale, offset, group), torch.randn(43)
    x = torch.randn(37, 384)
    tiles = KERNEL(x, weight, bias)
    rows = torch.cat([KERNEL(x[i : i + 3], weight, bias) for i in range(0, 37, 3)])
    torch.testing.assert_close(tiles, rows, rtol=1e-5, atol=1e-5)
    tiles_bf16 = KERNEL(x.bfloat16(), weight, bias)
    rows_bf16 = torch.cat([KERNEL(r[None], weight, bias) for r in x.bfloat16()])
    torch.testing.assert_close(tiles_bf16, rows_bf16, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (8, 256, True)])
def test_quant_linear_uses_it_for_decode_rows(bits: int, group: int, sym: bool) -> None:
    torch.manual_seed(2)
    qw: QuantizedWeight = quantize_rtn(torch.randn(64, 256), bits, group, sym)
    layer = QuantLinear(qw, None, torch.device("cpu"))
    assert layer.kernel == "qgemv" and layer.q is None  # codes kept only in the packing
    assert torch.equal(layer.codes(), qw.q)
    x = torch.randn(1, 256)
    ref = x @ qw.dequantize().T
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02
    # A batched decode step (or a short prompt) is still the kernel's: dequantizing the
    # whole weight for a few rows costs far more.
    batch = torch.randn(QGEMV_MAX_ROWS, 256)
    assert layer.kernel_rows >= QGEMV_MAX_ROWS
    assert torch.equal(layer(batch), layer.qgemv(batch))


def test_decode_arithmetic_sends_every_row_through_the_kernel() -> None:
    torch.manual_seed(3)
    layer = QuantLinear(quantize_rtn(torch.randn(32, 256), 4, 64, False), None, torch.device("cpu"))
    x = torch.randn(layer.kernel_rows + 1, 256)  # prefill-sized: the dense path by default
    dense = layer(x)
    assert use_decode_arithmetic(nn.Sequential(layer)) == 1
    as_decode = layer(x)
    assert torch.equal(as_decode, layer.qgemv(x))
    assert not torch.equal(as_decode, dense)  # int8-rounded activations
    assert ((as_decode - dense).norm() / dense.norm()).item() < 0.02


@pytest.mark.parametrize("bits,group", CASES)
def test_dequantize_writes_the_dense_weight(bits: int, group: int) -> None:
    """The dense path's one-pass copy is the weight the operands describe."""
    w_k, scale, offset, w = _operands(24, 384, bits, group, seed=5)
    out = torch.empty(24, 384)
    assert KERNEL.dequantize(Operands(w_k, bits, scale, offset, group), out) is out
    torch.testing.assert_close(out.double(), w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="does not take"):
        KERNEL.dequantize(Operands(w_k, bits, scale, offset, 96), torch.empty(24, 384))


@pytest.mark.parametrize("bits,group", CASES)
def test_fp16_metadata_gives_the_same_numbers(bits: int, group: int) -> None:
    """Scales and offsets that are fp16 values: read as fp16 (half the metadata bytes),
    the kernel and the dense copy give exactly what the fp32 copies give."""
    w_k, scale, offset, _ = _operands(24, 384, bits, group, seed=6)
    scale, offset = scale.half().float(), offset.half().float()
    s16, o16 = qgemv.compact_metadata(scale, offset)
    assert s16.dtype == o16.dtype == torch.float16
    x = torch.randn(5, 384)
    full, half = Operands(w_k, bits, scale, offset, group), Operands(w_k, bits, s16, o16, group)
    assert torch.equal(KERNEL(x, half), KERNEL(x, full))
    a, b = torch.empty(24, 384), torch.empty(24, 384)
    assert torch.equal(KERNEL.dequantize(half, a), KERNEL.dequantize(full, b))
    with pytest.raises(ValueError, match="both alike"):
        KERNEL(x, Operands(w_k, bits, s16, offset, group))


def test_metadata_stays_fp32_where_fp16_would_round_it() -> None:
    # A GPTQ grid: fp16 scales, offsets -zero * scale with more bits than fp16 holds.
    torch.manual_seed(7)
    qw = quantize_rtn(torch.randn(64, 256), 4, 64, False)
    layer = QuantLinear(qw, None, torch.device("cpu"))
    assert layer.kscale.dtype == torch.float32 and layer.koffset.dtype == torch.float32
    # Symmetric int8 per row: fp16 scales and zero offsets fit.
    sym = QuantLinear(quantize_rtn(torch.randn(64, 256), 8, 256, True), None, torch.device("cpu"))
    assert sym.kscale.dtype == torch.float16
