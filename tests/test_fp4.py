"""FP4 formats (llmopt/weights/fp4.py, e2m1.py) against the gguf package's reference
quantizer and dequantizers, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from llmopt.weights import e2m1, fp4


def _weight(out: int = 48, n: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g) * 0.1
    w[0, :64] = 0  # all-zero blocks
    w[1, :32] = w[1, :32].round()  # exact e2m1 values and ties
    return w


def test_mxfp4_by_the_max_is_ggufs_quantizer_bit_for_bit() -> None:
    w = _weight()
    qw = fp4.quantize_fp4(w, "mxfp4", search=False)
    blocks, t = fp4.to_blocks(qw)
    assert t == 1.0 and blocks.shape == (48, 256 // 32 * 17)
    assert np.array_equal(blocks.numpy(), quants.quantize(w.numpy(), Q.MXFP4))
    assert np.array_equal(qw.dequantize().numpy(), quants.dequantize(blocks.numpy(), Q.MXFP4))


@pytest.mark.parametrize("fmt,qtype", [("mxfp4", Q.MXFP4), ("nvfp4", Q.NVFP4)])
def test_blocks_decode_as_gguf_and_round_trip(fmt: str, qtype: Q) -> None:
    qw = fp4.quantize_fp4(_weight(seed=1), fmt)
    blocks, t = fp4.to_blocks(qw)
    ref = quants.dequantize(blocks.numpy(), qtype) * np.float32(t)  # NVFP4: t outside
    assert np.array_equal(qw.dequantize().numpy(), ref)
    back = fp4.from_blocks(blocks, qw.shape, fmt, t)
    assert torch.equal(back.q, qw.q) and torch.equal(back.scale, qw.scale)
    assert (back.bits, back.group_size, back.codebook) == (4, fp4.GROUP[fmt], "e2m1")


def test_scale_formats_decode_as_gguf() -> None:
    b = np.arange(256, dtype=np.uint8)
    assert np.array_equal(
        e2m1.e8m0_scale(torch.from_numpy(b)).numpy(), quants.MXFP4.e8m0_to_fp32_half(b)
    )
    half = quants.NVFP4.ue4m3_to_fp32(b).astype(np.float32)
    assert np.array_equal((e2m1.ue4m3_value(torch.from_numpy(b)) / 2).numpy(), half)
    values = e2m1.ue4m3_value(torch.arange(0x7F))
    assert torch.equal(e2m1.ue4m3_exact(values[1:]), torch.arange(1, 0x7F, dtype=torch.uint8))
    with pytest.raises(ValueError, match="e4m3"):
        e2m1.ue4m3_exact(torch.tensor([0.3]))


def test_e2m1_rounds_to_nearest_ties_to_the_smaller_magnitude() -> None:
    v = torch.tensor([0.0, -0.0, 0.25, -0.5, 0.5, 0.75, 2.5, 5.0, -5.0, 7.0, 10.0, 11.0, 99.0])
    got = [e2m1.DOUBLED[i] for i in e2m1.encode(v)]
    assert got == [0, 0, 0, 0, 0, 1, 2, 4, -4, 6, 8, 12, 12]
    assert e2m1.encode(torch.tensor([-0.25])).item() == 0  # rounds to +0, as GGUF's


@pytest.mark.parametrize("fmt", fp4.FORMATS)
def test_the_scale_search_lowers_the_error(fmt: str) -> None:
    w = _weight(seed=2)
    by_max = fp4.quantize_fp4(w, fmt, search=False).dequantize()
    searched = fp4.quantize_fp4(w, fmt).dequantize()
    assert (searched - w).pow(2).sum() < 0.95 * (by_max - w).pow(2).sum()
    # An input that counts more gets less error.
    imp = torch.ones(256)
    imp[:16] = 100.0
    weighted = fp4.quantize_fp4(w, fmt, importance=imp).dequantize()
    assert (weighted - w)[:, :16].pow(2).sum() <= (searched - w)[:, :16].pow(2).sum()


def test_nvfp4_scales_are_e4m3_times_a_power_of_two() -> None:
    w = _weight(seed=3) * 1000
    qw = fp4.quantize_fp4(w, "nvfp4")
    t = fp4.nvfp4_tensor_scale(qw)
    assert t == 2.0 ** round(np.log2(t))
    assert int(e2m1.ue4m3_exact(qw.scale * (2 / t)).max()) <= e2m1.UE4M3_MAX
    with pytest.raises(ValueError, match="e4m3"):
        fp4.to_blocks(fp4.fp4_weight(qw.q, qw.scale * 1.1, "nvfp4"))


def test_bad_shapes_and_formats_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        fp4.quantize_fp4(torch.randn(4, 48), "mxfp4")
    with pytest.raises(ValueError, match="unknown FP4 format"):
        fp4.quantize_fp4(torch.randn(4, 64), "fp4")
    with pytest.raises(ValueError, match="powers of two"):
        fp4.to_blocks(
            fp4.fp4_weight(torch.zeros(2, 32, dtype=torch.uint8), torch.full((2, 1), 0.3), "mxfp4")
        )
