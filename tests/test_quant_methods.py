"""Quantization methods on single random layers: the grid, RTN, GPTQ and AWQ."""

from __future__ import annotations

import pytest
import torch

from llmopt.quant import awq, awq_gptq, gptq, rtn
from llmopt.quant.calibration import InputStats
from llmopt.quant.drift import correct_drift
from llmopt.quant.spec import QuantSpec, Site
from llmopt.weights.qweight import QuantizedWeight, quantize_rtn


def _correlated_inputs(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels (a low-rank mix plus noise), as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=g)
    return torch.randn(rows, 8, generator=g) @ basis + 0.1 * torch.randn(rows, dim, generator=g)


def _site(x: torch.Tensor, names: list[str], owner: str | None = None) -> Site:
    stats = InputStats()
    stats.add(x)
    return Site(names, stats, owner)


def _output_error(w: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ qw.dequantize().T).pow(2).mean())


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, True)])
def test_rtn_is_within_half_a_step(bits: int, sym: bool) -> None:
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(bits))
    qw = quantize_rtn(w, bits, 64, sym)
    step = qw.scale.repeat_interleave(64, dim=1)
    zero = qw.zero.repeat_interleave(64, dim=1)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) < 2**bits
    err = (qw.dequantize() - w).abs()
    # Inside the grid's range every weight rounds to within half a step; at its ends
    # (the integer zero point shifts the range by up to half a step) within one.
    lo, hi = (0 - zero) * step, (2**bits - 1 - zero) * step
    inside = (w >= lo) & (w <= hi)
    assert (err[inside] <= 0.5 * step[inside] + 1e-6).all()
    assert (err <= step + 1e-6).all()


def _q4_1_weights(out: int, n: int, seed: int) -> torch.Tensor:
    """(out, n) weights on a GGUF Q4_1 grid: codes 0..15 (both ends in every block of
    32, as llama.cpp's min/max rounding leaves them) times an fp16 scale, plus an fp16
    minimum per block."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out, n), generator=g)
    q[:, 0::32], q[:, 1::32] = 0, 15
    d = (torch.rand(out, n // 32, 1, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(out, n // 32, 1, generator=g) * 0.15).half().float()
    return (q.view(out, -1, 32) * d + m).view(out, n)


def test_float_zero_grid_finds_a_q4_1_grid_again() -> None:
    """A model that came as a Q4_1 file: its minimums and scales are each group's own
    min/max, so the float-zero grid is the file's and every weight comes back; an
    integer zero point shifts the grid off it."""
    w = _q4_1_weights(48, 256, seed=6)
    fz = quantize_rtn(w, 4, 32, float_zero=True)
    torch.testing.assert_close(fz.dequantize(), w, rtol=0, atol=1e-6)
    assert (quantize_rtn(w, 4, 32).dequantize() - w).abs().max() > 1e-3
    x = _correlated_inputs(512, 256)
    for static in (False, True):  # input order, or act-order in the input order's groups
        g = gptq.gptq(w, x.T @ x, 4, 32, False, static, static_groups=static, float_zero=True)
        torch.testing.assert_close(g.dequantize(), w, rtol=0, atol=1e-6)  # no error to feed


def test_float_zero_grid_rounds_every_weight_to_within_half_a_step() -> None:
    """Its range is the group's min/max, so no weight is clipped (fp16 rounding of the
    scale and minimum aside), where an integer zero point clips up to half a step."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(7)) + 0.3
    qw = quantize_rtn(w, 4, 32, float_zero=True)
    step = qw.scale.repeat_interleave(32, dim=1)
    assert ((qw.dequantize() - w).abs() <= 0.5 * step * 1.01 + 1e-6).all()


def test_grid_keeps_zero_exact_and_handles_zero_rows() -> None:
    w = torch.randn(4, 64)
    w[1] = 0
    qw = quantize_rtn(w, 4, 32)
    deq = qw.dequantize()
    assert torch.equal(deq[1], torch.zeros(64))
    assert torch.isfinite(deq).all()


def test_cat_and_split_round_trip() -> None:
    a, b = quantize_rtn(torch.randn(8, 64), 4, 32), quantize_rtn(torch.randn(4, 64), 4, 32)
    fused = QuantizedWeight.cat([a, b])
    back = fused.split([8, 4])
    assert torch.equal(back[0].dequantize(), a.dequantize())
    assert torch.equal(back[1].q, b.q)


def test_gptq_beats_rtn_on_correlated_inputs() -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = _correlated_inputs(2048, 256)
    spec = QuantSpec(bits=4, method="gptq", group_size=64, sym=False)
    site = _site(x, ["w"])
    q_gptq = gptq.quantize_layer([site], {"w": w}, spec)["w"]
    q_rtn = rtn.quantize_layer([site], {"w": w}, spec)["w"]
    e_gptq, e_rtn = _output_error(w, q_gptq, x), _output_error(w, q_rtn, x)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)


@pytest.mark.parametrize("fp4", [None, "mxfp4"])
def test_gptq_static_groups_keep_input_order_and_the_act_order_gain(fp4: str | None) -> None:
    """Static groups: act-order's column order with the input order's groups, so no
    `perm`; the grids are fixed before the loop (for integers, RTN's grid of the
    unquantized weights), and the output error stays near dynamic groups', far below
    RTN's."""
    torch.manual_seed(2)
    w = torch.randn(48, 256)
    x = _correlated_inputs(2048, 256) * torch.linspace(0.2, 3.0, 256)  # uneven activity
    group = 32
    common = {"bits": 4, "method": "gptq", "group_size": group, "sym": False, "fp4": fp4}
    site = _site(x, ["w"])
    run = {
        kind: gptq.quantize_layer([site], {"w": w}, QuantSpec(**common, **flags))["w"]
        for kind, flags in {
            "static": {"act_order": True, "static_groups": True},
            "dynamic": {"act_order": True},
            "natural": {},  # GPTQ in input order
        }.items()
    }
    static, dynamic = run["static"], run["dynamic"]
    assert static.perm is None and dynamic.perm is not None
    if fp4 is None:  # the grids are the unquantized weights' own (min/max per group)
        fixed = quantize_rtn(w, 4, group, False)
        assert torch.equal(static.scale, fixed.scale) and torch.equal(static.zero, fixed.zero)
    errors = {kind: _output_error(w, qw, x) for kind, qw in run.items()}
    rtn_error = _output_error(w, rtn.quantize_layer([site], {"w": w}, QuantSpec(**common))["w"], x)
    assert errors["static"] < 0.7 * rtn_error, (errors, rtn_error)
    assert errors["static"] < 1.2 * errors["dynamic"], errors


@pytest.mark.parametrize("fp4", [None, "mxfp4"])
def test_gptq_damping_moves_it_from_the_calibration_fit_towards_round_to_nearest(
    fp4: str | None,
) -> None:
    """The damping is a prior of uncorrelated inputs: overwhelming it, GPTQ feeds no
    error forward and rounds each weight to nearest, as on the Hessian's diagonal alone;
    the less of it, the closer the fit to the calibration inputs."""
    torch.manual_seed(3)
    w, x = torch.randn(32, 128), _correlated_inputs(1024, 128)
    h = x.T @ x
    swamped = gptq.gptq(w, h, 4, 32, False, False, fp4, damp=1e9)
    rounded = gptq.gptq(w, torch.diag(h.diagonal()), 4, 32, False, False, fp4)
    assert torch.equal(swamped.q, rounded.q) and torch.equal(swamped.scale, rounded.scale)
    errors = [
        _output_error(w, gptq.gptq(w, h, 4, 32, False, False, fp4, damp=d), x)
        for d in (0.01, 0.1, 10.0)
    ]
    assert errors[0] < errors[1] < errors[2], errors


def test_gptq_of_fused_rows_equals_separate_rows() -> None:
    """Rows are independent given H: fusing q/k/v must not change any row's result."""
    torch.manual_seed(1)
    x = _correlated_inputs(512, 128)
    a, b = torch.randn(16, 128), torch.randn(8, 128)
    spec = QuantSpec(bits=4, method="gptq", group_size=32, sym=False)
    fused = gptq.quantize_layer([_site(x, ["a", "b"])], {"a": a, "b": b}, spec)
    alone = gptq.quantize_layer([_site(x, ["b"])], {"b": b}, spec)
    assert torch.equal(fused["b"].q, alone["b"].q)


@pytest.mark.parametrize("method", ["awq", "awq-gptq"])
@pytest.mark.parametrize("fp4", [None, "mxfp4", "nvfp4"])
def test_awq_beats_rtn_when_a_few_channels_dominate(fp4: str | None, method: str) -> None:
    """On the integer grid and on FP4's: the searched scales, with AWQ's ranges or GPTQ's
    rounding after them, beat round to nearest."""
    torch.manual_seed(2)
    dim = 256
    w = torch.randn(128, dim) * 0.02
    x = torch.randn(1024, dim)
    x[:, :4] *= 50  # outlier channels, as after LLM norms
    norm = torch.ones(dim)
    group = {None: 64, "mxfp4": 32, "nvfp4": 16}[fp4]
    spec = QuantSpec(bits=4, method=method, group_size=group, sym=False, fp4=fp4)
    tensors = {"w": w.clone(), "norm": norm.clone()}
    site = _site(x, ["w"], owner="norm")
    q_awq = {"awq": awq, "awq-gptq": awq_gptq}[method].quantize_layer([site], tensors, spec)["w"]
    # The model's function: x (norm output, scaled by the folded norm) through the layer.
    x_scaled = x * tensors["norm"]
    y_awq = x_scaled @ q_awq.dequantize().T
    q_rtn = rtn.quantize_layer([_site(x, ["w"])], {"w": w}, spec)["w"]
    ref = x @ w.T
    e_awq = float((y_awq - ref).pow(2).mean())
    e_rtn = float((x @ q_rtn.dequantize().T - ref).pow(2).mean())
    # MXFP4's power-of-two group scales leave a scaled channel less to gain
    assert e_awq < (0.8 if fp4 == "mxfp4" else 0.7) * e_rtn, (e_awq, e_rtn)


def test_awq_scale_folding_preserves_the_function_before_rounding() -> None:
    torch.manual_seed(3)
    w, up, bias = torch.randn(16, 32), torch.randn(32, 8), torch.randn(32)
    x = torch.randn(64, 32).abs() + 0.1
    spec = QuantSpec(bits=4, method="awq", group_size=32, sym=False)
    s = awq.search_scale(w, x.T @ x, x.abs().mean(0), awq.weight_magnitude(w, 32), spec, 32)
    assert not torch.allclose(s, torch.ones_like(s))
    tensors = {"down.weight": w.clone(), "up.weight": up.clone(), "up.bias": bias.clone()}
    site = _site(x, ["down.weight"], owner="up.weight")
    awq._apply_scale(site, tensors, s)
    # up's rows and bias produce down's input channels: dividing both by s undoes w * s.
    h = torch.randn(5, 8)
    before = (h @ up.T + bias) @ w.T
    after = (h @ tensors["up.weight"].T + tensors["up.bias"]) @ tensors["down.weight"].T
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_awq_group_error_from_the_gram_matches_the_rows() -> None:
    """The clipping search scores a group's rounding error d as d^T X_g^T X_g d, from
    X^T X: the same number as the error of the group's own outputs on the rows."""
    torch.manual_seed(4)
    x, d = _correlated_inputs(300, 96), torch.randn(5, 3, 32)  # d: (rows, groups, g)
    from_gram = awq._group_error(d, awq._group_grams(x.T @ x, 32))
    from_rows = torch.einsum("tgk,rgk->trg", x.view(300, 3, 32), d).pow(2).sum(0)
    torch.testing.assert_close(from_gram, from_rows, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("fz", [False, True])
def test_awq_grid_search_never_loses_to_min_max_rounding(fz: bool) -> None:
    """min/max is one of the ranges tried, so no group's output error can be worse than
    RTN's on the same weights; with a few dominant input channels it is far lower."""
    torch.manual_seed(5)
    w = torch.randn(48, 128)
    x = _correlated_inputs(1024, 128)
    x[:, :3] *= 20
    gram = x.T @ x
    searched = awq.quantize_on(w, *awq.search_grid(w, gram, 4, 32, False, fz), 4, 32)
    plain = quantize_rtn(w, 4, 32, float_zero=fz)
    grams = awq._group_grams(gram, 32)

    def group_errors(qw: QuantizedWeight) -> torch.Tensor:  # (rows, groups)
        return awq._group_error((qw.dequantize() - w).view(48, 4, 32), grams)

    assert (group_errors(searched) <= group_errors(plain) * (1 + 1e-5)).all()
    assert _output_error(w, searched, x) < 0.8 * _output_error(w, plain, x)


def test_awq_scale_on_grouped_heads_folds_into_v_and_keeps_the_function() -> None:
    """Under grouped-query attention o_proj's input channel (kv, h, d) is v's channel
    (kv, d), so o's scale is tied across the heads that share a kv head, and folding
    1/s into v's rows leaves o(v) as it was."""
    torch.manual_seed(6)
    kv, share, hd, hidden = 2, 3, 8, 16
    v, o = torch.randn(kv * hd, hidden), torch.randn(hidden, kv * share * hd)
    x = torch.randn(256, kv * share * hd).abs() * torch.linspace(0.1, 5, kv * share * hd)
    tensors = {"v": v.clone(), "o": o.clone()}
    stats = InputStats()
    stats.add(x)
    site = Site(["o"], stats, owner="v", share=share, head_dim=hd)
    (s,) = awq.fold_scales([site], tensors, QuantSpec(4, "awq", 16, False))
    assert s is not None and not torch.allclose(s, torch.ones_like(s))
    heads = s.view(kv, share, hd)
    assert torch.equal(heads, heads[:, :1].expand_as(heads))

    def attention_out(v_w: torch.Tensor, o_w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        values = (h @ v_w.T).view(-1, kv, 1, hd).expand(-1, kv, share, hd)
        return values.reshape(h.shape[0], -1) @ o_w.T  # each kv head read by `share` heads

    h = torch.randn(7, hidden)
    torch.testing.assert_close(
        attention_out(tensors["v"], tensors["o"], h), attention_out(v, o, h), rtol=1e-4, atol=1e-4
    )


def _drifted_site(seed: int, names: list[str]) -> tuple[Site, torch.Tensor, torch.Tensor]:
    """A site whose inputs x~ drifted from the full-precision x by a fixed linear map
    plus noise (what quantized blocks before do to a later block's inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = _correlated_inputs(4096, 128, seed)
    mix = torch.eye(128) + 0.05 * torch.randn(128, 128, generator=g)
    x_drift = x @ mix + 0.02 * torch.randn(x.shape, generator=g)
    stats = InputStats()
    stats.add(x_drift)
    stats.add_drift(x, x_drift)
    return Site(names, stats, None), x, x_drift


def test_drift_correction_fits_the_full_precision_outputs() -> None:
    """alpha 1 is the least-squares weight for x~ -> W x (up to the damping): it cuts
    the error against the full-precision outputs, fused rows split back in place, and
    alpha 0 leaves the weights alone."""
    site, x, x_drift = _drifted_site(4, ["a", "b"])
    a, b = torch.randn(24, 128), torch.randn(8, 128)
    tensors = {"a": a.clone(), "b": b.clone()}
    correct_drift(site, tensors, 0.0)
    assert torch.equal(tensors["a"], a) and torch.equal(tensors["b"], b)
    correct_drift(site, tensors, 1.0)
    assert tensors["a"].shape == a.shape and tensors["b"].shape == b.shape
    for w, fitted in ((a, tensors["a"]), (b, tensors["b"])):
        before = (x_drift @ w.T - x @ w.T).pow(2).mean()
        after = (x_drift @ fitted.T - x @ w.T).pow(2).mean()
        assert after < 0.2 * before, (after, before)
    alone = {"b": b.clone()}
    correct_drift(Site(["b"], site.stats, None), alone, 1.0)
    torch.testing.assert_close(alone["b"], tensors["b"])


def test_gptq_after_drift_correction_is_closer_to_the_full_precision_outputs() -> None:
    site, x, x_drift = _drifted_site(5, ["w"])
    w = torch.randn(64, 128)
    spec = QuantSpec(bits=4, method="gptq", group_size=32, sym=False)
    plain = gptq.quantize_layer([site], {"w": w}, spec)["w"]
    tensors = {"w": w.clone()}
    correct_drift(site, tensors, 0.5)
    corrected = gptq.quantize_layer([site], tensors, spec)["w"]
    ref = x @ w.T

    def err(qw: QuantizedWeight) -> float:
        return float((x_drift @ qw.dequantize().T - ref).pow(2).mean())

    assert err(corrected) < 0.8 * err(plain), (err(corrected), err(plain))


def test_spec_errors() -> None:
    from llmopt.errors import UsageError

    with pytest.raises(UsageError, match="divide"):
        QuantSpec(bits=4, method="rtn", group_size=100, sym=False).group_for(576)
    with pytest.raises(UsageError, match="unknown method"):
        QuantSpec(bits=4, method="hqq", group_size=128, sym=False)
    with pytest.raises(UsageError, match="between 0 and 1"):
        QuantSpec(bits=4, method="gptq", group_size=64, sym=False, drift=1.5)
    with pytest.raises(UsageError, match="no zero point to make float"):
        QuantSpec(bits=4, method="gptq", group_size=32, sym=True, float_zero=True)
    with pytest.raises(UsageError, match="needs GPTQ or AWQ block by block"):
        QuantSpec(bits=4, method="awq", group_size=64, sym=False, sequential=False, drift=0.25)


@pytest.mark.parametrize("method", [rtn, awq_gptq])
def test_int8_linears_are_int8_beside_fp4(method) -> None:
    """A spec's int8_linears round to int8 (symmetric, one scale per row, in input order)
    and its other linears to its own grid; a site cannot mix the two."""
    from llmopt.errors import UsageError

    x = _correlated_inputs(512, 64)
    g = torch.Generator().manual_seed(1)
    tensors = {n: torch.randn(32, 64, generator=g) * 0.02 for n in ("a", "b", "c")}
    spec = QuantSpec(bits=4, method="awq-gptq" if method is awq_gptq else "rtn",
                     group_size=32, sym=False, act_order=True, fp4="mxfp4",
                     int8_linears=("b",))  # fmt: skip
    out = method.quantize_layer([_site(x, ["a"]), _site(x, ["b"])], dict(tensors), spec)
    assert (out["a"].codebook, out["a"].group_size) == ("e2m1", 32)
    assert (out["b"].bits, out["b"].codebook, out["b"].group_size) == (8, None, 64)
    assert out["b"].perm is None and bool((out["b"].zero == 128).all())
    step = out["b"].scale  # (32, 1): the int8 rounding stays within a step or so
    assert ((out["b"].dequantize() - tensors["b"]).abs() / step).max() < 2
    with pytest.raises(UsageError, match="int8 and 4-bit linears in one site"):
        method.quantize_layer([_site(x, ["b", "c"])], dict(tensors), spec)
    with pytest.raises(UsageError, match="go with a 4-bit model"):
        QuantSpec(bits=8, method="rtn", group_size=0, sym=True, int8_linears=("b",))


def test_calibration_goes_block_by_block_with_drift_correction_by_default() -> None:
    assert QuantSpec(bits=4, method="gptq", group_size=64, sym=False).sequential is True
    assert QuantSpec(bits=4, method="awq", group_size=64, sym=False).sequential is True
    one_pass = QuantSpec(bits=4, method="awq", group_size=64, sym=False, sequential=False)
    # Drift correction goes with block by block, where it has a full-precision stream.
    assert QuantSpec(bits=4, method="gptq", group_size=64, sym=False).drift == 0.25
    assert QuantSpec(bits=4, method="awq", group_size=64, sym=False).drift == 0.5
    assert one_pass.drift == 0
    assert QuantSpec(bits=4, method="rtn", group_size=64, sym=False).drift == 0


def test_capturing_with_stop_skips_the_rest_of_the_pass() -> None:
    from torch import nn

    from llmopt.quant.calibration import capturing

    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    calls: list[str] = []
    second.register_forward_hook(lambda *_: calls.append("second"))
    net = nn.Sequential(first, nn.ReLU(), second)
    x = torch.randn(3, 4)
    with capturing({"first": first}, stop=True) as got:
        net(x)
    assert torch.equal(got["first"], x) and calls == []
    with capturing({"first": first, "second": second}) as got:
        y = net(x)
    assert calls == ["second"] and torch.equal(got["second"], torch.relu(first(x)))
    assert y.shape == (3, 4)


def test_awq_weight_magnitude_is_relative_to_each_group() -> None:
    w = torch.randn(64, 128)
    w[:, 5] *= 50  # one input channel's weights dominate their group
    m = awq.weight_magnitude(w, 32)
    assert m.shape == (128,) and bool((m > 0).all()) and bool((m <= 1).all())
    assert m[5] > 0.95 and int(m[:32].argmax()) == 5
    # Scaling a whole group leaves it unchanged: the measure is relative to the group.
    w2 = w.clone()
    w2[:, 32:64] *= 7
    torch.testing.assert_close(awq.weight_magnitude(w2, 32), m)
