"""GPTQ (Frantar et al., 2022): quantize a weight one input column at a time and
push each column's rounding error onto the columns not yet quantized, weighted by
the inverse Hessian of the layer's output error, H = 2 X^T X / n.

Rows are independent given H, so linears that read the same input (q/k/v,
gate/up) are quantized as one fused matrix. Columns go in their natural order, or
with act-order (the default) by decreasing Hessian diagonal; groups are contiguous
in that order, and the weight records it as `perm`. Each group's grid is chosen when
the loop reaches it, from the weights as updated by then. With static groups
(static_groups=), act-order keeps the groups of the input order instead, their grids
chosen up front from the unquantized weights: the columns still go by decreasing
activation, but the codes land in input order and no `perm` is needed, so the kernel
reads its input as it is (no gather per linear at run time) and GGUF's blocks can hold
the result.

The grid is an integer one (scale and zero point per group) or FP4's (fp4=): then a
group's scale is the one of least error weighted by the Hessian's diagonal (the
inputs' mean square: the output error of each weight's own rounding), and a column is
rounded to the nearest e2m1 value, its error fed forward as for integers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from llmopt.quant.spec import DEFAULT_DAMP, QuantSpec, Site
from llmopt.weights import e2m1, fp4
from llmopt.weights.qweight import QuantizedWeight, check_group_size, grid, quantize_to

DAMP = DEFAULT_DAMP["gptq"]  # GPTQ's usual damping (the others' by method are there too)
BLOCK = 128  # columns updated together before the lazy update of the rest


def damped_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower Cholesky factor (in, in), float64, of H plus `damp` of its mean diagonal."""
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(h)


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (in, in), after damping."""
    lower = damped_cholesky(h, damp)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()


@contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop is thousands of small ops, each too small to split: with more
    threads each op waits on the others, many times slower than one thread alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    act_order: bool,
    fp4_format: str | None = None,
    static_groups: bool = False,
    float_zero: bool = False,
    damp: float = DAMP,
) -> QuantizedWeight:
    """w: (out, in) float; h: (in, in) Hessian of the layer's inputs; damp: of its mean
    diagonal, added before the inverse (damped_cholesky).

    act_order: quantize the channels with the largest Hessian diagonal (the most
    active inputs) first, while the most columns remain to absorb their error. The
    groups are then contiguous in that order, recorded as the weight's `perm`, or,
    with static_groups, the input order's groups with grids fixed before the loop.
    """
    out, n = w.shape
    check_group_size(n, group_size)
    w = w.float().clone()
    h = h.clone()
    dead = h.diagonal() == 0  # channels never active in calibration: weight irrelevant
    h[dead, dead] = 1
    w[:, dead] = 0
    tensor_scale = fp4.tensor_scale_for(w) if fp4_format == "nvfp4" else 1.0
    scales = torch.empty(out, n // group_size, device=w.device)
    zeros = torch.empty(out, n // group_size, device=w.device)

    def set_grid(g: int, wg: torch.Tensor, imp: torch.Tensor) -> None:
        """Group g's grid from its weights wg (out, group) and inputs' importance imp."""
        if fp4_format:
            s = fp4.choose_scale(wg, fp4_format, tensor_scale, imp)
            z = torch.full_like(s, float(e2m1.ZERO))
        else:
            s, z = grid(wg, bits, sym, float_zero=float_zero)
        scales[:, g], zeros[:, g] = s, z

    static = act_order and static_groups
    if static:
        for g in range(n // group_size):
            cols = slice(g * group_size, (g + 1) * group_size)
            set_grid(g, w[:, cols], h.diagonal()[cols].float())
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    # (in,) each column's group, in the loop's column order
    group_of = (perm if static else torch.arange(n, device=w.device)) // group_size
    hinv = _inverse_hessian_factor(h, damp)
    diag = h.diagonal().float()  # (in,) FP4's scale search weighs each input by it
    q = torch.empty(out, n, dtype=torch.uint8, device=w.device)
    block = max(BLOCK // group_size, 1) * group_size  # whole groups per block
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = w[:, b0:b1].clone()  # (out, B): this block, updated in place
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if not static and col % group_size == 0:
                # The grid of a group is set from its weights as updated so far (its
                # min/max: a range searched on the group's Hessian block, as AWQ's,
                # does not score better).
                cols = slice(col, col + group_size)
                set_grid(col // group_size, wb[:, i : i + group_size], diag[cols])
            g = int(group_of[col])
            if fp4_format:
                qc, deq = fp4.round_to(wb[:, i : i + 1], scales[:, g])
                qc, deq = qc[:, 0], deq[:, 0]
            else:
                qc = quantize_to(wb[:, i : i + 1], scales[:, g], zeros[:, g], bits)[:, 0]
                deq = (qc.float() - zeros[:, g]) * scales[:, g]
            q[:, col] = qc
            e = (wb[:, i] - deq) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    codebook = "e2m1" if fp4_format else None
    if static:  # codes back in input order, where their groups are
        q = torch.empty_like(q).index_copy_(1, perm, q)
        perm = None
    return QuantizedWeight(q, scales, zeros, bits, group_size, perm, codebook)


def round_site(
    site: Site, tensors: dict[str, torch.Tensor], spec: QuantSpec, h: torch.Tensor
) -> dict[str, QuantizedWeight]:
    """The site's fused weight through GPTQ on the Hessian h (in, in), unfused."""
    w, spec = site.fused(tensors), spec.site_spec(site)
    group = spec.group_for(w.shape[1])
    with _one_thread():
        qw = gptq(
            w, h, spec.bits, group, spec.sym, spec.act_order,
            spec.fp4, spec.static_groups, spec.float_zero, spec.damp,
        )  # fmt: skip
    return site.unfuse(tensors, qw)


def quantize_layer(
    sites: list[Site], tensors: dict[str, torch.Tensor], spec: QuantSpec
) -> dict[str, QuantizedWeight]:
    out: dict[str, QuantizedWeight] = {}
    for site in sites:
        out.update(round_site(site, tensors, spec, site.stats.hessian()))
    return out
