"""AWQ (Lin et al., 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest, and the rounding
error of the weights they multiply dominates the output error. AWQ multiplies those
weight columns by s > 1 before rounding (so their relative error shrinks) and
divides the input by s, folding 1/s into whatever produced the input: the RMSNorm
weight before q/k/v and gate/up (Gemma's 1 + w as a whole), the rows of up_proj before
down_proj, the rows of v_proj before o_proj (with grouped-query attention each v
channel feeds several heads, and their scales are tied; AutoAWQ skips o_proj there),
and a linear owner's bias with its rows (Qwen2's v_proj). The model's function is
unchanged before rounding.

Per site: s = mean|x|^alpha, or mean|x|^alpha / mean|w|^(1 - alpha) (the weight's
magnitude per input channel, relative to its group's largest: a channel whose weights
are already large in their groups needs less help), alpha from a grid of 20, the
candidate chosen by the output error ||X (W - Q(W s) / s)^T||^2; then each group's
range [lo, hi] is shrunk where that lowers the group's output error, each end by its
own factor. Both errors are read off the inputs' X^T X (for an error d,
||X d||^2 = d^T X^T X d), so every calibration row scores every candidate at a cost
that does not grow with the rows. q and k rows are not clipped: attention logits
amplify them.

On FP4's grids (spec.fp4) the scale search rounds with FP4's own round to nearest, and
each group's range is the one of least output error among the format's candidate
scales (fp4.choose_scale: the OCP rule from the maximum, one step up, one down): MXFP4's
power-of-two scales leave no finer range to search.
"""

from __future__ import annotations

import torch

from llmopt.quant.spec import QuantSpec, Site
from llmopt.weights import fp4
from llmopt.weights.qweight import QuantizedWeight, grid, quantize_rtn, quantize_to

SCALE_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5  # the smallest range tried is half the group's min/max


def _rtn_dequant(w: torch.Tensor, spec: QuantSpec, group: int) -> torch.Tensor:
    """w (out, in) rounded to nearest on the spec's grid, dequantized."""
    if spec.fp4:
        return fp4.quantize_fp4(w, spec.fp4).dequantize()
    return quantize_rtn(w, spec.bits, group, spec.sym, spec.float_zero).dequantize()


def weight_magnitude(w: torch.Tensor, group: int) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's largest |w|: (in,)."""
    out, n = w.shape
    wg = w.abs().reshape(out, n // group, group)
    return (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).reshape(out, n).mean(0)


def search_scale(
    w: torch.Tensor,
    gram: torch.Tensor,
    x_mean: torch.Tensor,
    w_mean: torch.Tensor,
    spec: QuantSpec,
    group: int,
) -> torch.Tensor:
    """The per-input-channel scale (in,) that minimises ||x W^T - x Q(W s)^T / s|| over
    the calibration rows x, from their gram = x^T x (in, in), x_mean (in,) = mean |x|
    and w_mean (in,) = weight_magnitude(w)."""
    best_err, best = float("inf"), torch.ones_like(x_mean)
    x_mean = x_mean.clamp(min=1e-4)
    for k in range(SCALE_GRID):
        a = k / SCALE_GRID
        for s in (x_mean.pow(a), x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)):
            s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
            d = _rtn_dequant(w * s, spec, group) / s - w  # (out, in)
            err = ((d @ gram) * d).sum().item()  # sum over rows of ||x d^T||^2
            if err < best_err:
                best_err, best = err, s
    return best


def _group_grams(gram: torch.Tensor, group: int) -> torch.Tensor:
    """The diagonal blocks of an (in, in) Gram matrix: (G, g, g), one per group."""
    groups = gram.shape[0] // group
    blocks = gram.reshape(groups, group, groups, group)
    return blocks.diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _candidates(sym: bool) -> list[tuple[float, float]]:
    """(lo, hi) shrink factors tried per group: every pair of CLIP_GRID steps down to
    MAX_SHRINK (a symmetric grid shrinks both ends alike)."""
    steps = [1 - k / CLIP_GRID for k in range(int(CLIP_GRID * (1 - MAX_SHRINK)))]
    if sym:
        return [(f, f) for f in steps]
    return [(a, b) for a in steps for b in steps]


def search_grid(
    w: torch.Tensor, gram: torch.Tensor, bits: int, group: int, sym: bool, float_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) scale and zero, each (out, G), for the weights w (out, in) whose
    inputs X have gram = X^T X (in, in): among the candidate ranges (_candidates), the
    one minimising the group's output error d^T X_g^T X_g d (d: its rounding error)."""
    out, n = w.shape
    wg = w.reshape(out, n // group, group)  # (out, G, g)
    lo0, hi0 = wg.amin(-1), wg.amax(-1)  # (out, G); grid puts 0 in range where it must
    hb = _group_grams(gram, group)  # (G, g, g)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = torch.ones_like(lo0), torch.zeros_like(lo0)
    for f_lo, f_hi in _candidates(sym):
        lo, hi = (lo0 * f_lo).reshape(-1), (hi0 * f_hi).reshape(-1)
        scale, zero = grid(wg.reshape(-1, group), bits, sym, lo, hi, float_zero)
        scale, zero = scale.view_as(lo0), zero.view_as(lo0)
        err = _group_error(_dequant(wg, scale, zero, bits) - wg, hb)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def search_fp4(w: torch.Tensor, gram: torch.Tensor, fmt: str) -> QuantizedWeight:
    """w (out, in) on FP4's grid, each group's scale the format's candidate
    (fp4.choose_scale) of least output error d^T X_g^T X_g d, gram = X^T X (in, in)."""
    out, n = w.shape
    g = fp4.GROUP[fmt]
    t = fp4.tensor_scale_for(w) if fmt == "nvfp4" else 1.0
    groups = w.float().reshape(-1, g)  # (out * G, g)
    hb = _group_grams(gram, g)  # (G, g, g)

    def output_error(d: torch.Tensor) -> torch.Tensor:  # (out * G, g) -> (out * G,)
        return _group_error(d.view(out, n // g, g), hb).reshape(-1)

    scale = fp4.choose_scale(groups, fmt, t, error=output_error)
    nibbles, _ = fp4.round_to(groups, scale)
    return fp4.fp4_weight(nibbles.view(out, n), scale.view(out, -1), fmt)


def _dequant(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """wg (out, G, g) rounded onto the grids scale, zero (out, G) and dequantized."""
    q = quantize_to(wg.reshape(-1, wg.shape[-1]), scale, zero, bits).view_as(wg)
    return (q.float() - zero[..., None]) * scale[..., None]


def _group_error(d: torch.Tensor, hb: torch.Tensor) -> torch.Tensor:
    """d (out, G, g) rounding errors, hb (G, g, g) group Grams: d^T H_g d, (out, G)."""
    hd = torch.bmm(d.transpose(0, 1), hb).transpose(0, 1)  # (out, G, g)
    return (hd * d).sum(-1)


def quantize_on(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int
) -> QuantizedWeight:
    """w (out, in) rounded onto the given grid (scale, zero: (out, G))."""
    q = quantize_to(w.reshape(-1, group), scale, zero, bits).view_as(w)
    return QuantizedWeight(q, scale, zero, bits, group)


def _apply_scale(site: Site, tensors: dict[str, torch.Tensor], s: torch.Tensor) -> None:
    """Multiply the site's weight columns by s and fold 1/s into the owner: its weight
    and, where it has one, its bias."""
    for name in site.names:
        tensors[name] = tensors[name].float() * s
    assert site.owner is not None, "a site without an owner has nothing to fold into"
    s, bias = site.owner_part(s), site.owner_bias
    # The owner's output channels are its first dimension: a norm weight's (in,), a
    # linear's rows (in, k) and its bias (in,). Dividing the rows and not the bias
    # would hand the site x / s + b instead of (x + b) / s.
    owned = [site.owner] + ([bias] if bias in tensors else [])
    for name in owned:
        # A norm stored as an offset from one (Gemma: 1 + w) scales as the whole.
        t, off = tensors[name], site.owner_offset if name == site.owner else 0.0
        tensors[name] = ((off + t.float()) / s.view(-1, *(1,) * (t.dim() - 1)) - off).to(t.dtype)


def fold_scales(
    sites: list[Site], tensors: dict[str, torch.Tensor], spec: QuantSpec
) -> list[torch.Tensor | None]:
    """Search every site's scale (in,) on the layer's original weights, then apply them
    all, mutating `tensors` (weights and the owners they fold into); None for a site
    without an owner.

    Searching before applying matters where one site's owner is another's weight
    (down_proj folds into up_proj rows, which gate/up then quantizes).
    """

    def search(site: Site) -> torch.Tensor | None:
        if site.owner is None:
            return None
        w = site.fused(tensors)
        grid = spec.site_spec(site)  # the grid its weights will be rounded to
        group = grid.group_for(w.shape[1])
        stats = site.stats
        # Tied scales follow from tied magnitudes.
        x_mean, w_mean = site.tie(stats.abs_mean()), site.tie(weight_magnitude(w, group))
        return search_scale(w, stats.gram(), x_mean, w_mean, grid, group)

    scales = [search(site) for site in sites]
    for site, s in zip(sites, scales, strict=True):
        if s is not None:
            _apply_scale(site, tensors, s)
    return scales


def round_site(
    site: Site, tensors: dict[str, torch.Tensor], spec: QuantSpec, gram: torch.Tensor
) -> dict[str, QuantizedWeight]:
    """Clip each group's range where that lowers its output error on the site's
    inputs as the scaled weights see them (gram: their X^T X, (in, in)), then round."""
    w, spec = site.fused(tensors), spec.site_spec(site)
    if spec.fp4:
        return site.unfuse(tensors, _round_fp4(w, site.no_clip, gram, spec.fp4))
    group = spec.group_for(w.shape[1])
    args = spec.bits, group, spec.sym
    scale, zero = search_grid(w[site.no_clip :], gram, *args, spec.float_zero)
    if site.no_clip:  # q and k rows keep their min/max grid
        rtn = quantize_rtn(w[: site.no_clip], *args, spec.float_zero)
        scale, zero = torch.cat([rtn.scale, scale]), torch.cat([rtn.zero, zero])
    return site.unfuse(tensors, quantize_on(w, scale, zero, spec.bits, group))


def _round_fp4(w: torch.Tensor, no_clip: int, gram: torch.Tensor, fmt: str) -> QuantizedWeight:
    """FP4's round_site: the first no_clip rows (q, k) by the format's own scale choice
    (least weight error), the rest by output error (search_fp4)."""
    rest = search_fp4(w[no_clip:], gram, fmt)
    if not no_clip:
        return rest
    head = fp4.quantize_fp4(w[:no_clip], fmt)
    return fp4.fp4_weight(torch.cat([head.q, rest.q]), torch.cat([head.scale, rest.scale]), fmt)


def quantize_layer(
    sites: list[Site], tensors: dict[str, torch.Tensor], spec: QuantSpec
) -> dict[str, QuantizedWeight]:
    """Scale the layer's sites (fold_scales), then clip and round each."""
    scales = fold_scales(sites, tensors, spec)
    out: dict[str, QuantizedWeight] = {}
    for site, s in zip(sites, scales, strict=True):
        gram = site.stats.gram()
        if s is not None:  # the inputs the scaled weights see are x / s
            gram = gram / (s[:, None] * s[None, :])
        out.update(round_site(site, tensors, spec, gram))
    return out
