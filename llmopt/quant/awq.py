"""AWQ (Lin et al., 2023): activation-aware weight quantization.

A few input channels carry much larger activations than the rest, and the rounding
error of the weights they multiply dominates the output error. AWQ multiplies those
weight columns by s > 1 before rounding (so their relative error shrinks) and
divides the input by s, folding 1/s into whatever produced the input: the RMSNorm
weight before q/k/v and gate/up, the rows of up_proj before down_proj. The model's
function is unchanged before rounding.

Per site: s = mean|x|^alpha, alpha from a grid of 20, chosen by the output error on
calibration rows; then each group's range is shrunk (clipped) where that lowers the
group's output error. q and k rows are not clipped: attention logits amplify them.
"""

from __future__ import annotations

import torch

from llmopt.quant.qweight import QuantizedWeight, grid, quantize_rtn, quantize_to
from llmopt.quant.spec import QuantSpec, Site

SCALE_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5  # the smallest range tried is half the group's min/max
CLIP_ROWS = 256  # calibration rows that score the clipping
ROW_BATCH = 256  # output rows scored at a time (bounds memory: rows x tokens x groups)


def _rtn_dequant(w: torch.Tensor, bits: int, group: int, sym: bool) -> torch.Tensor:
    return quantize_rtn(w, bits, group, sym).dequantize()


def search_scale(
    w: torch.Tensor, x: torch.Tensor, x_mean: torch.Tensor, bits: int, group: int, sym: bool
) -> torch.Tensor:
    """The per-input-channel scale (in,) that minimises ||x W^T - x Q(W s)^T / s||.

    w: (out, in); x: (rows, in) calibration inputs; x_mean: (in,) mean |x|.
    """
    ref = x @ w.T  # (rows, out)
    best_err, best = float("inf"), torch.ones_like(x_mean)
    for k in range(SCALE_GRID):
        s = x_mean.clamp(min=1e-4).pow(k / SCALE_GRID)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        wq = _rtn_dequant(w * s, bits, group, sym) / s
        err = (x @ wq.T - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best = err, s
    return best


def search_clip(
    w: torch.Tensor, x: torch.Tensor, bits: int, group: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) range (lo, hi), each (out, G), minimising the group's output error."""
    out, n = w.shape
    groups = n // group
    xg = x[:CLIP_ROWS].reshape(-1, groups, group)  # (T, G, g)
    lo_all, hi_all = [], []
    for r0 in range(0, out, ROW_BATCH):
        wg = w[r0 : r0 + ROW_BATCH].reshape(-1, groups, group)  # (R, G, g)
        lo0, hi0 = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # (R, G)
        ref = torch.einsum("tgk,rgk->trg", xg, wg)
        best_err = torch.full_like(lo0, float("inf"))
        best_lo, best_hi = lo0.clone(), hi0.clone()
        for k in range(int(CLIP_GRID * (1 - MAX_SHRINK))):
            f = 1 - k / CLIP_GRID
            lo, hi = lo0 * f, hi0 * f
            flat = wg.reshape(-1, group).clamp(lo.reshape(-1, 1), hi.reshape(-1, 1))
            scale, zero = grid(flat, bits, sym, lo.reshape(-1), hi.reshape(-1))
            deq = (quantize_to(flat, scale, zero, bits).float() - zero[:, None]) * scale[:, None]
            err = (torch.einsum("tgk,rgk->trg", xg, deq.view_as(wg)) - ref).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better, lo, best_lo)
            best_hi = torch.where(better, hi, best_hi)
        lo_all.append(best_lo)
        hi_all.append(best_hi)
    return torch.cat(lo_all), torch.cat(hi_all)


def quantize_clipped(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, group: int, sym: bool
) -> QuantizedWeight:
    out, n = w.shape
    flat = w.reshape(-1, group).clamp(lo.reshape(-1, 1), hi.reshape(-1, 1))
    scale, zero = grid(flat, bits, sym, lo.reshape(-1), hi.reshape(-1))
    q = quantize_to(flat, scale, zero, bits).view(out, n)
    return QuantizedWeight(q, scale.view(out, -1), zero.view(out, -1), bits, group)


def _apply_scale(site: Site, tensors: dict[str, torch.Tensor], s: torch.Tensor) -> None:
    """Multiply the site's weight columns by s and fold 1/s into the owner."""
    for name in site.names:
        tensors[name] = tensors[name].float() * s
    owner = tensors[site.owner]
    # A norm weight (in,) scales its output channels; a linear (in, k) its rows.
    tensors[site.owner] = (owner.float() / (s if owner.dim() == 1 else s[:, None])).to(owner.dtype)


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
        group = spec.group_for(w.shape[1])
        stats = site.stats
        return search_scale(w, stats.sample(), stats.abs_mean(), spec.bits, group, spec.sym)

    scales = [search(site) for site in sites]
    for site, s in zip(sites, scales, strict=True):
        if s is not None:
            _apply_scale(site, tensors, s)
    return scales


def round_site(
    site: Site, tensors: dict[str, torch.Tensor], spec: QuantSpec, x: torch.Tensor
) -> dict[str, QuantizedWeight]:
    """Clip each group's range where that lowers its output error on the rows x
    (rows, in) of the site's input as the scaled weights see it, then round."""
    w = site.fused(tensors)
    group = spec.group_for(w.shape[1])
    keep = w[: site.no_clip].reshape(site.no_clip, w.shape[1] // group, group)
    lo, hi = search_clip(w[site.no_clip :], x, spec.bits, group, spec.sym)
    lo = torch.cat([keep.amin(-1).clamp(max=0), lo])
    hi = torch.cat([keep.amax(-1).clamp(min=0), hi])
    return site.unfuse(tensors, quantize_clipped(w, lo, hi, spec.bits, group, spec.sym))


def quantize_layer(
    sites: list[Site], tensors: dict[str, torch.Tensor], spec: QuantSpec
) -> dict[str, QuantizedWeight]:
    """Scale the layer's sites (fold_scales), then clip and round each."""
    scales = fold_scales(sites, tensors, spec)
    out: dict[str, QuantizedWeight] = {}
    for site, s in zip(sites, scales, strict=True):
        x = site.stats.sample() if s is None else site.stats.sample() / s
        out.update(round_site(site, tensors, spec, x))
    return out
