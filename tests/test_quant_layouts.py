"""Checkpoint layouts (ours, GPTQ, AWQ): pack/unpack round trips, bit-exact, and the
runtime linear built from them."""

from __future__ import annotations

import sys

import pytest
import torch

from llmopt.layers.linear import cpu_has_amx
from llmopt.layers.quant_linear import QuantLinear, use_exact_arithmetic
from llmopt.quant.checkpoint import quantization_config
from llmopt.quant.spec import QuantSpec
from llmopt.weights.layouts import awq, gptq, native
from llmopt.weights.qweight import QuantizedWeight, quantize_rtn


def _random_qweight(out: int, n: int, bits: int, group: int, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    return QuantizedWeight(
        q=torch.randint(0, maxq + 1, (out, n), generator=g, dtype=torch.uint8),
        scale=(torch.rand(out, n // group, generator=g) * 0.01 + 1e-3).half().float(),
        zero=torch.randint(1, maxq + 1, (out, n // group), generator=g).float(),
        bits=bits,
        group_size=group,
    )


def _assert_same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.q, b.q)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero, b.zero)
    assert (a.bits, a.group_size) == (b.bits, b.group_size)
    torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 128), (8, 256)])
def test_native_round_trip(bits: int, group: int) -> None:
    qw = _random_qweight(64, 256, bits, group)
    spec = QuantSpec(bits, "rtn", group, sym=False)
    _assert_same(native.unpack(native.pack(qw), quantization_config("llmopt", spec)), qw)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 64)])
def test_gptq_round_trip(bits: int, group: int) -> None:
    qw = _random_qweight(64, 256, bits, group)
    packed = gptq.pack(qw)
    f = 32 // bits
    assert packed["qweight"].shape == (256 // f, 64) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (256 // group, 64 // f)
    assert packed["scales"].shape == (256 // group, 64) and packed["scales"].dtype == torch.float16
    assert torch.equal(packed["g_idx"], torch.arange(256, dtype=torch.int32) // group)
    spec = QuantSpec(bits, "gptq", group, False)
    _assert_same(gptq.unpack(packed, quantization_config("gptq", spec)), qw)


def test_gptq_layout_bits_are_where_the_format_says() -> None:
    """Spot-check against the format's definition rather than our own inverse."""
    qw = _random_qweight(8, 64, 4, 32)
    packed = gptq.pack(qw)
    word = int(packed["qweight"][1, 3]) & 0xFFFFFFFF  # input rows 8..15 of output 3
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == qw.q[3, 8:16].tolist()
    zword = int(packed["qzeros"][1, 0]) & 0xFFFFFFFF  # group 1, outputs 0..7, stored zero - 1
    assert [(zword >> (4 * k)) & 0xF for k in range(8)] == (qw.zero[:8, 1] - 1).int().tolist()


def test_gptq_act_order_round_trip_and_v2_zeros() -> None:
    qw = _random_qweight(32, 128, 4, 32)
    qw.perm = torch.randperm(128, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(4, "gptq", 32, False, act_order=True)
    packed = gptq.pack(qw)
    assert (packed["g_idx"][1:] < packed["g_idx"][:-1]).any()  # really unsorted
    back = gptq.unpack(packed, quantization_config("gptq", spec))
    torch.testing.assert_close(back.dequantize(), qw.dequantize(), rtol=0, atol=0)
    v2 = dict(packed, qzeros=gptq._pack_int32(qw.zero.long(), 4).T.contiguous())  # no offset
    back2 = gptq.unpack(v2, {**quantization_config("gptq", spec), "checkpoint_format": "gptq_v2"})
    torch.testing.assert_close(back2.dequantize(), qw.dequantize(), rtol=0, atol=0)


def test_native_layout_keeps_an_input_order_and_refuses_one_that_is_not() -> None:
    """The kernels gather x[perm[k]] unchecked: a perm read from a file must be an order
    of the inputs (each once, none out of range)."""
    qw = _random_qweight(32, 128, 4, 32)
    qw.perm = torch.randperm(128, generator=torch.Generator().manual_seed(5))
    spec = QuantSpec(4, "gptq", 32, False, act_order=True)
    packed = native.pack(qw)
    back = native.unpack(packed, quantization_config("llmopt", spec))
    assert torch.equal(back.perm, qw.perm)
    for bad in (packed["perm"].clone().fill_(0), packed["perm"] + 1, packed["perm"][:-1]):
        with pytest.raises(ValueError, match="not an order of its 128 inputs"):
            native.unpack({**packed, "perm": bad}, quantization_config("llmopt", spec))


def test_gptq_zero_point_of_zero_borrows_like_other_tools() -> None:
    """v1 zeros are stored minus one per field, subtracted from the whole word: a zero
    of 0 borrows from the next field, and reading adds the word back exactly."""
    qw = _random_qweight(8, 64, 4, 32)
    qw.zero[0, 0], qw.zero[1, 0] = 0, 5
    packed = gptq.pack(qw)
    word = int(packed["qzeros"][0, 0]) & 0xFFFFFFFF
    assert word & 0xF == 0xF and (word >> 4) & 0xF == 5 - 1 - 1  # the borrow
    spec = QuantSpec(4, "gptq", 32, False)
    _assert_same(gptq.unpack(packed, quantization_config("gptq", spec)), qw)


def test_awq_round_trip_and_interleaving() -> None:
    qw = _random_qweight(64, 256, 4, 64)
    packed = awq.pack(qw)
    assert packed["qweight"].shape == (256, 8) and packed["qzeros"].shape == (4, 8)
    word = int(packed["qweight"][5, 1]) & 0xFFFFFFFF  # input 5, outputs 8..15
    nibbles = [(word >> (4 * k)) & 0xF for k in range(8)]
    assert nibbles == [int(qw.q[8 + j, 5]) for j in (0, 2, 4, 6, 1, 3, 5, 7)]
    spec = QuantSpec(4, "awq", 64, False)
    _assert_same(awq.unpack(packed, quantization_config("awq", spec)), qw)


@pytest.mark.parametrize(
    "bits,group,sym,shape",
    [
        (4, 64, False, (96, 128)),
        (4, 32, True, (64, 256)),
        (8, 128, True, (64, 128)),
        (8, 32, False, (64, 128)),
        (4, 32, False, (40, 96)),
    ],
)
def test_quant_linear_matches_dequantized_weight(bits, group, sym, shape) -> None:
    torch.manual_seed(0)
    qw = quantize_rtn(torch.randn(*shape), bits, group, sym)
    layer = QuantLinear(qw, torch.randn(shape[0]), torch.device("cpu"))
    ref = qw.dequantize()
    torch.testing.assert_close(layer.dequantize(torch.float32), ref, rtol=0, atol=0)
    # bf16 rounded as torch rounds (the AMX dense path multiplies this copy)
    assert torch.equal(layer.dequantize(torch.bfloat16), ref.bfloat16())
    x = torch.randn(1, shape[1])
    if layer.kernel:  # the row kernel (int8 activations)
        torch.testing.assert_close(layer(x), x @ ref.T + layer.bias, rtol=0.05, atol=0.5)
    else:  # no row kernel takes the shape: the dense path
        _assert_dense_product(layer(x), x, ref, layer.bias)
    if layer.kernel_rows < sys.maxsize:  # AMX (or no kernel): long calls go dense
        x = torch.randn(layer.kernel_rows + 1, shape[1])
        _assert_dense_product(layer(x), x, ref, layer.bias)
    use_exact_arithmetic(layer)  # the dequantized weight in fp32, for any number of rows
    x = torch.randn(8, shape[1])
    torch.testing.assert_close(layer(x), x @ ref.T + layer.bias, rtol=1e-4, atol=1e-4)


def _assert_dense_product(got, x, w, bias=None) -> None:
    """got == x w^T (+ bias) as QuantLinear's dense CPU path computes it: a bf16 GEMM on
    AMX (the same rounding, summed in another order: a bf16 step apart at most), else
    fp32."""
    if cpu_has_amx():
        want, tol = (x.bfloat16() @ w.bfloat16().T).float(), 1e-2
    else:
        want, tol = x @ w.T, 1e-4
    want = want if bias is None else want + bias
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_quant_linear_with_act_order_permutes_its_input() -> None:
    torch.manual_seed(1)
    qw = quantize_rtn(torch.randn(64, 128), 4, 32)
    qw.perm = torch.randperm(128)
    layer = QuantLinear(qw, None, torch.device("cpu"))
    x = torch.randn(7, 128)  # row kernel
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T, rtol=0.05, atol=0.5)
    use_exact_arithmetic(layer)  # the dense path
    x = torch.randn(300, 128)
    torch.testing.assert_close(layer(x), x @ qw.dequantize().T, rtol=1e-4, atol=1e-4)


def test_native_layout_stores_a_float_zero_grid_as_fp16_minimums() -> None:
    torch.manual_seed(2)
    qw = quantize_rtn(torch.randn(64, 256), 4, 32, float_zero=True)
    assert not torch.equal(qw.zero, qw.zero.round())  # fractional zero points
    packed = native.pack(qw)
    assert "qzeros" not in packed and packed["qmins"].dtype == torch.float16
    spec = QuantSpec(4, "rtn", 32, sym=False, float_zero=True)
    back = native.unpack(packed, quantization_config("llmopt", spec))
    assert torch.equal(back.q, qw.q) and torch.equal(back.scale, qw.scale)
    torch.testing.assert_close(back.dequantize(), qw.dequantize(), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="neither qzeros nor qmins"):
        native.unpack({"qweight": packed["qweight"], "scales": packed["scales"]}, {"bits": 4})
    with pytest.raises(ValueError, match="fractional zero points"):
        gptq.pack(qw)  # the GPTQ and AWQ layouts hold integers only


def test_quant_linear_runs_a_float_zero_grid_on_its_fp16_minimums() -> None:
    """The kernels read the minimums as fp16 offsets (2 bytes a group, as a Q4_1
    block's), not fp32, and give the dequantized weight's product."""
    torch.manual_seed(3)
    qw = quantize_rtn(torch.randn(64, 256), 4, 32, float_zero=True)
    layer = QuantLinear(qw, None, torch.device("cpu"))
    ref = qw.dequantize()
    torch.testing.assert_close(layer.dequantize(torch.float32), ref, rtol=0, atol=1e-6)
    x = torch.randn(3, 256)
    if layer.kernel == "qgemv":
        assert layer.kscale.dtype == layer.koffset.dtype == torch.float16
        torch.testing.assert_close(layer(x), x @ ref.T, rtol=0.05, atol=0.5)
    use_exact_arithmetic(layer)
    torch.testing.assert_close(layer(x), x @ ref.T, rtol=1e-4, atol=1e-4)
