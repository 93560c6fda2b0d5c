"""The int4/int5/int6/int8/FP4 decode kernel (llmopt/kernels/qgemv.c) against a float64 reference.

Its only approximation is rounding the activations to int8 per 64 inputs, so inputs
that are already integers with 127 in every 64-block go through exactly, and the
result must match to float rounding; ordinary inputs stay within that rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmopt.kernels import qgemv
from llmopt.kernels.qgemv import Operands
from llmopt.layers.quant_linear import (
    QuantLinear,
    use_decode_arithmetic,
    use_exact_arithmetic,
)
from llmopt.weights import e2m1
from llmopt.weights.fp4 import quantize_fp4
from llmopt.weights.qweight import QuantizedWeight, quantize_rtn
from tests.conftest import require_kernel

KERNEL = qgemv.load()


@pytest.fixture(autouse=True)
def _kernel_built() -> None:
    require_kernel(KERNEL)  # skips without a C compiler; a failed build fails


FORMS = ["f32", "f16", "zero"]  # the kernels' forms of scale and offset


def _op(w_k: torch.Tensor, bits: int | str, scale, offset, group: int) -> Operands:
    """Operands of 4, 5, 6 or 8 bits, or of FP4 ("e2m1": 4-bit codes through the codebook)."""
    if bits == "e2m1":
        return Operands(w_k, 4, scale, offset, group, "e2m1")
    return Operands(w_k, bits, scale, offset, group)


def _operands(n: int, k: int, bits: int | str, group: int, seed: int = 0, form: str = "zero"):
    """Random codes and affine terms, the kernel's operands (codes, scale, offset) with
    the metadata in `form`, and the dense weight w = scale * code + offset (float64;
    code q, or q - 128 as int8 is stored, or e2m1's integer for nibble q)."""
    g = torch.Generator().manual_seed(seed)
    fp4 = bits == "e2m1"
    bits = 4 if fp4 else bits
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, generator=g) * 0.01 + 1e-3).half().float()
    zero = torch.randint(0, 2**bits, (n, k // group), generator=g).float()
    base = 128 if bits == 8 else 0
    offset = (base - zero) * scale  # exact in fp32: 11 bits times 9
    if form == "f16":  # offsets that are fp16 numbers but no integer zero (GGUF Q4_1)
        offset = (offset + 1e-3 * torch.rand(offset.shape, generator=g)).half().float()
    code = (e2m1.CODES[q.long()] if fp4 else q).double() - base
    w = (code.view(n, -1, group) * scale[..., None] + offset[..., None]).view(n, k)
    w_k = qgemv.pack_codes(q, bits) if bits < 8 else code.to(torch.int8)
    if form == "zero":
        return w_k, qgemv.block_rows(scale.half()), qgemv.block_rows(zero.to(torch.uint8)), w
    if form == "f16":
        return w_k, qgemv.block_rows(scale.half()), qgemv.block_rows(offset.half()), w
    return w_k, qgemv.block_rows(scale), qgemv.block_rows(offset), w


CASES = [
    (4, 32), (4, 64), (4, 128), (8, 64), (8, 32), (8, 192), (8, 16), (4, 16),
    ("e2m1", 32), ("e2m1", 16), ("e2m1", 64), (5, 32), (5, 16), (5, 64), (6, 16), (6, 32),
]  # fmt: skip


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("rows", [1, 3, 20])  # 20: AMX tiles where the CPU has them
@pytest.mark.parametrize("form", FORMS)
def test_exact_on_integer_activations(bits: int | str, group: int, rows: int, form: str) -> None:
    n, k = 43, 384  # not a multiple of the kernel's 8-row blocks
    w_k, scale, offset, w = _operands(n, k, bits, group, form=form)
    bias = torch.randn(n)
    x = torch.randint(-127, 128, (rows, k)).float()
    x[:, ::64] = 127  # every 64-block's scale is exactly 1
    y = KERNEL(x, _op(w_k, bits, scale, offset, group), bias)
    ref = x.double() @ w.T + bias.double()
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("rows", [2, 17])
def test_bf16_activations_within_int8_rounding(bits: int | str, group: int, rows: int) -> None:
    n, k = 96, 768
    w_k, scale, offset, w = _operands(n, k, bits, group, seed=1)
    x = torch.randn(rows, k).bfloat16()
    y = KERNEL(x, _op(w_k, bits, scale, offset, group))
    assert y.dtype == torch.bfloat16
    ref = x.double() @ w.T
    # Rounding each input to max|x|/127 steps: about 0.7% of a Gaussian row's norm.
    assert ((y.double() - ref).norm() / ref.norm()).item() < 0.02


@pytest.mark.parametrize("bits", [4, 5, 6])
def test_packing_round_trips(bits: int) -> None:
    q = torch.randint(0, 2**bits, (8, 192), dtype=torch.uint8)
    packed = qgemv.pack_codes(q, bits)
    assert packed.shape == (8, 192 * bits // 8)
    assert torch.equal(qgemv.unpack_codes(packed, bits), q)


def test_int5_layout() -> None:
    """A chunk's 40 bytes: the low nibbles as int4 packs them, then bit j of a
    little-endian uint64 for input j's fifth bit."""
    q = torch.zeros(1, 64, dtype=torch.uint8)
    q[0, 3], q[0, 40], q[0, 63] = 17, 31, 16
    packed = qgemv.pack_codes(q, 5)[0]
    assert packed[3] == 1 and packed[8] == 15 << 4  # input 40: the high nibble of byte 8
    assert int.from_bytes(bytes(packed[32:].tolist()), "little") == (1 << 3) | (1 << 40) | (1 << 63)


def test_shapes_it_does_not_take() -> None:
    assert not qgemv.supports(4, 96, 32)  # inputs not a multiple of 64
    assert not qgemv.supports(4, 384, 96)  # a group that straddles 64-input chunks
    assert not qgemv.supports(3, 384, 64)
    w_k, scale, zero, _ = _operands(8, 192, 4, 64)
    two, x = scale[:, :2], torch.randn(1, 192)  # two groups of 96
    with pytest.raises(ValueError, match="does not take"):
        KERNEL(x, Operands(w_k, 4, two, zero[:, :2], 96))
    flat = scale.transpose(1, 2).reshape(8, 3)  # (N, G): not the blocked layout
    with pytest.raises(ValueError, match="block_rows"):
        KERNEL(x, Operands(w_k, 4, flat, flat, 64))
    with pytest.raises(ValueError, match="uint8 zeros"):  # zero points take fp16 scales
        KERNEL(x, Operands(w_k, 4, scale.float(), zero, 64))
    with pytest.raises(ValueError, match="no codebook"):  # e2m1 codes are 4-bit
        KERNEL(x, Operands(w_k, 8, scale, zero, 64, "e2m1"))


@pytest.mark.parametrize(
    "bits,group", [(4, 32), (4, 64), (4, 256), (5, 32), (6, 16), (8, 16), (8, 32), (8, 256)]
)
def test_rows_are_independent(bits: int | str, group: int) -> None:
    """A row's result does not depend on the rows beside it: the same numbers whatever
    the other rows hold, and the same as the row alone (one arithmetic for every row
    count, AMX tiles included)."""
    w_k, scale, offset, _ = _operands(24, 256, bits, group)
    x = torch.randn(19, 256)  # more than two 8-row register blocks, and a partial one
    weight = _op(w_k, bits, scale, offset, group)
    whole = KERNEL(x, weight)
    others = torch.cat([x[:5], torch.randn(14, 256)])
    assert torch.equal(KERNEL(others, weight)[:5], whole[:5])
    one_by_one = torch.cat([KERNEL(row[None], weight) for row in x])
    assert torch.equal(whole, one_by_one)


@pytest.mark.parametrize("bits,group", CASES)
def test_the_avx2_blocks_agree_and_keep_rows_independent(bits: int | str, group: int) -> None:
    """Where the CPU has AVX-512 VNNI its tiles run from 4 rows on; the AVX2 blocks
    (what other CPUs run) are built apart and checked here: the same integers and the
    same float operations in the same order, so the same bits, and a row's result
    independent of the rows beside it. 40 rows of W: two 16-row tiles and a
    partial one."""
    avx2 = qgemv.load(avx2=True)
    assert avx2 is not None
    w_k, scale, offset, _ = _operands(40, 384, bits, group, seed=7)
    weight, bias = _op(w_k, bits, scale, offset, group), torch.randn(40)
    x = torch.randn(13, 384)
    whole = avx2(x, weight, bias)
    assert torch.equal(whole, KERNEL(x, weight, bias))
    assert torch.equal(torch.cat([avx2(row[None], weight, bias) for row in x]), whole)


@pytest.mark.parametrize("tiles", ["cpu", "emulated"])
@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_amx_tiles_agree_with_the_row_kernel(
    tiles: str, bits: int | str, group: int, form: str
) -> None:
    """From 9 rows on the kernel runs on AMX tiles: the same integer products and the
    same float operations in the same order as the row kernel, so the same bits; partial
    tiles of rows of x (37 = 2 x 16 + 5) and of W (43 = 2 x 16 + 11). On the CPU's
    tiles where it has AMX, and everywhere (with AVX-512) on tiles emulated in C."""
    amx = require_kernel(
        qgemv.load(emulate_amx=tiles == "emulated"), isa="AMX" if tiles == "cpu" else "AVX-512"
    )
    if tiles == "cpu" and not amx.amx:  # the CPU has AMX; Linux did not grant its state
        pytest.skip("AMX tile state not granted to this process (arch_prctl)")
    assert amx.amx, "with AVX-512 the emulated build runs on tiles"
    w_k, scale, offset, w = _operands(43, 384, bits, group, seed=8, form=form)
    weight, bias = _op(w_k, bits, scale, offset, group), torch.randn(43)
    x = torch.randn(37, 384)
    on_tiles = amx(x, weight, bias)
    rows = torch.cat([KERNEL(x[i : i + 3], weight, bias) for i in range(0, 37, 3)])
    assert torch.equal(on_tiles, rows)
    tiles_bf16 = amx(x.bfloat16(), weight, bias)
    rows_bf16 = torch.cat([KERNEL(r[None], weight, bias) for r in x.bfloat16()])
    assert torch.equal(tiles_bf16, rows_bf16)
    xi = torch.randint(-127, 128, (20, 384)).float()
    xi[:, ::64] = 127  # integer activations: exact but for float rounding
    ref = xi.double() @ w.T + bias.double()
    got = amx(xi, weight, bias).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("bits,group,sym", [(4, 64, False), (8, 256, True)])
def test_quant_linear_uses_it_for_decode_rows(bits: int | str, group: int, sym: bool) -> None:
    torch.manual_seed(2)
    qw: QuantizedWeight = quantize_rtn(torch.randn(64, 256), bits, group, sym)
    layer = QuantLinear(qw, None, torch.device("cpu"))
    assert layer.kernel == "qgemv" and layer.q is None  # codes kept only in the packing
    assert torch.equal(layer.codes(), qw.q)
    x = torch.randn(1, 256)
    ref = x @ qw.dequantize().T
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02
    # A batched decode step and a prefill chunk are the kernel's too (any number of
    # rows: one arithmetic for every step).
    batch = torch.randn(512, 256)
    assert torch.equal(layer(batch), layer.qgemv(batch))


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_quant_linear_runs_fp4_packed(fmt: str) -> None:
    """FP4 runs on qgemv's 4-bit packing, its nibbles mapped through the e2m1 table: the
    layer's codes, dense copy and embedding rows are the weight's, and its product
    agrees with the dequantized weight to the activations' int8 rounding."""
    torch.manual_seed(4)
    qw = quantize_fp4(torch.randn(48, 256) * 0.05, fmt)
    layer = QuantLinear(qw, None, torch.device("cpu"))
    assert layer.kernel == "qgemv" and layer.q is None
    assert layer.kscale.dtype == torch.float16  # power-of-two (MXFP4) or e4m3 scales
    assert torch.equal(layer.codes(), qw.grid_codes())
    assert torch.equal(layer.dequantize(torch.float32), qw.dequantize())
    assert torch.equal(layer.rows(torch.tensor([5, 40])), qw.dequantize()[[5, 40]])
    x = torch.randn(3, 256)
    ref = x @ qw.dequantize().T
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02


def test_decode_arithmetic_sends_every_row_through_the_kernel() -> None:
    torch.manual_seed(3)
    layer = QuantLinear(quantize_rtn(torch.randn(32, 256), 4, 64, False), None, torch.device("cpu"))
    x = torch.randn(300, 256)
    assert use_decode_arithmetic(nn.Sequential(layer)) == 1
    as_decode = layer(x)
    assert torch.equal(as_decode, layer.qgemv(x))
    use_exact_arithmetic(nn.Sequential(layer))
    dense = layer(x)
    assert not torch.equal(as_decode, dense)  # int8-rounded activations
    assert ((as_decode - dense).norm() / dense.norm()).item() < 0.02


@pytest.mark.parametrize("bits,group", CASES)
@pytest.mark.parametrize("form", FORMS)
def test_dequantize_writes_the_dense_weight(bits: int | str, group: int, form: str) -> None:
    """The dense path's one-pass copy is the weight the operands describe."""
    w_k, scale, offset, w = _operands(24, 384, bits, group, seed=5, form=form)
    out = torch.empty(24, 384)
    assert KERNEL.dequantize(_op(w_k, bits, scale, offset, group), out) is out
    torch.testing.assert_close(out.double(), w, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="does not take"):
        KERNEL.dequantize(_op(w_k, bits, scale, offset, 96), torch.empty(24, 384))


@pytest.mark.parametrize("bits,group", CASES)
def test_compact_metadata_gives_the_same_weights(bits: int | str, group: int) -> None:
    """An integer grid's fp16 scales and uint8 zero points describe exactly the weights
    its fp32 scales and offsets do: the dense copies are equal, and the kernel's sums
    (its offset terms added in another order) equal to float rounding."""
    w_k, s32, o32, _ = _operands(24, 384, bits, group, seed=6, form="f32")
    _, s16, zero, _ = _operands(24, 384, bits, group, seed=6, form="zero")
    full, small = _op(w_k, bits, s32, o32, group), _op(w_k, bits, s16, zero, group)
    a, b = torch.empty(24, 384), torch.empty(24, 384)
    assert torch.equal(KERNEL.dequantize(small, a), KERNEL.dequantize(full, b))
    x = torch.randn(5, 384)
    torch.testing.assert_close(KERNEL(x, small), KERNEL(x, full), rtol=1e-5, atol=1e-5)


def test_kernel_metadata_takes_the_fewest_bytes_that_keep_the_weights() -> None:
    g = torch.Generator().manual_seed(7)
    scale = (torch.rand(16, 4, generator=g) * 0.01 + 1e-3).half().float()
    zero = torch.randint(0, 16, (16, 4), generator=g).float()
    # Every GPTQ / AWQ / RTN grid: fp16 scales, integer zeros -> (N, G) uint8 zeros.
    s, z = qgemv.kernel_metadata(scale, zero, 4)
    assert (s.dtype, z.dtype, z.shape) == (torch.float16, torch.uint8, (2, 4, 8))
    assert torch.equal(z, qgemv.block_rows(zero.to(torch.uint8)))
    # A GGUF Q4_1 grid: fractional zeros, fp16 minimums -> blocked fp16 offsets.
    minimum = (torch.rand(16, 4, generator=g) * -0.01).half().float()
    s, o = qgemv.kernel_metadata(scale, -minimum / scale, 4)
    assert (s.dtype, o.dtype) == (torch.float16, torch.float16)
    torch.testing.assert_close(o.float(), qgemv.block_rows(minimum), rtol=2**-20, atol=0)
    # Scales fp16 would round: fp32, with int8's offsets taking the stored q - 128 back.
    fine = scale * (1 + 2**-15)
    s, o = qgemv.kernel_metadata(fine, zero, 8)
    assert (s.dtype, o.dtype) == (torch.float32, torch.float32)
    assert torch.equal(o, qgemv.block_rows((128 - zero) * fine))
    layer = QuantLinear(quantize_rtn(torch.randn(64, 256), 4, 64, False), None, torch.device("cpu"))
    assert layer.koffset.dtype == torch.uint8


def _kquant_operands(n: int, k: int, bits: int, group: int, seed: int = 0):
    """Random codes on a K-quant's grid (scale = d * sc, offset = dmin * m per group, d
    and dmin per 256 inputs): the packed codes, META_K's operands, and the dense weight
    (float64)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    d = (torch.rand(n, k // 256, generator=g) * 0.01 + 1e-3).half()
    dmin = -(torch.rand(n, k // 256, generator=g) * 0.01).half()
    sc = torch.randint(-128, 128, (n, k // group), generator=g, dtype=torch.int8)
    m = torch.randint(0, 64, (n, k // group), generator=g, dtype=torch.int8)
    per = 256 // group
    scale = d.double().repeat_interleave(per, 1) * sc.double()
    offset = dmin.double().repeat_interleave(per, 1) * m.double()
    w = (q.double().view(n, -1, group) * scale[..., None] + offset[..., None]).view(n, k)
    w_k = qgemv.pack_codes(q, bits) if bits < 8 else (q.int() - 128).to(torch.int8)
    kscale, koffset = qgemv.kquant_metadata(d, sc, dmin, m)
    return w_k, kscale, koffset, w


def _build(build: str) -> qgemv.QGemv:
    """The kernel as this CPU runs it, its AVX2 blocks, or its AMX path on emulated tiles
    (skipped without AVX-512)."""
    kernel = {
        "native": KERNEL,
        "avx2": qgemv.load(avx2=True),
        "emulated": qgemv.load(emulate_amx=True),
    }[build]
    return require_kernel(kernel, isa="AVX-512" if build == "emulated" else None)


@pytest.mark.parametrize("bits,group", [(4, 32), (5, 32), (6, 16), (6, 32), (8, 16), (4, 64)])
@pytest.mark.parametrize("build", ["native", "avx2", "emulated"])
def test_kquant_metadata_on_every_path(bits: int, group: int, build: str) -> None:
    """META_K (a K-quant's int8 sub-scales and fp16 super-block factors) gives the
    weights exactly: integer activations are exact but for float rounding, on the row
    kernel, the AVX2 blocks and AMX tiles (1, 5 and 20 rows), with the same bits on
    each; qdequant writes the dense weight."""
    kernel = _build(build)
    n, k = 43, 512
    w_k, kscale, koffset, w = _kquant_operands(n, k, bits, group)
    weight, bias = Operands(w_k, bits, kscale, koffset, group), torch.randn(n)
    for rows in (1, 5, 20):
        x = torch.randint(-127, 128, (rows, k)).float()
        x[:, ::64] = 127
        ref = x.double() @ w.T + bias.double()
        got = kernel(x, weight, bias)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4 * ref.abs().max().item())
        assert torch.equal(got, KERNEL(x, weight, bias))
    dense = KERNEL.dequantize(weight, torch.empty(n, k))
    torch.testing.assert_close(dense.double(), w, rtol=0, atol=1e-6 * w.abs().max().item())
    short = Operands(w_k[:, : 384 * bits // 8], bits, kscale, koffset, group)
    with pytest.raises(ValueError, match="does not take"):  # rows of 384: no super-blocks
        KERNEL(torch.randn(1, 384), short)


@pytest.mark.parametrize("build", ["native", "avx2", "emulated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_input_order_is_applied_as_x_is_read(build: str, dtype: torch.dtype) -> None:
    """With perm (GPTQ's act-order), the kernel reads input perm[k] for W's column k
    as it quantizes x: the same bits as the input gathered beforehand, on every path
    (1, 5 and 20 rows: the row kernel, AVX2 blocks and AMX tiles)."""
    kernel = _build(build)
    n, k, group = 40, 256, 32
    w_k, scale, offset, _ = _operands(n, k, 4, group)
    weight = _op(w_k, 4, scale, offset, group)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    for rows in (1, 5, 20):
        x = torch.randn(rows, k).to(dtype)
        got = kernel(x, weight, None, perm.to(torch.int32))  # the file's dtype: converted
        assert torch.equal(got, kernel(x[:, perm].contiguous(), weight))
        assert not torch.equal(got, kernel(x, weight))  # the order matters
