"""AWQ's scales, then GPTQ's rounding: the two methods fix different errors.

AWQ (quant/awq.py) moves a few input channels' large activations into their weights,
so that those weights' relative rounding error shrinks; GPTQ (quant/gptq.py) rounds one
column at a time and feeds each column's error to the columns left. Here AWQ's scale
search and fold run first, exactly as in AWQ, and GPTQ then rounds the scaled weights
on the inputs they see (x / s, so the Hessian X^T X becomes X^T X / (s s^T)), in place
of AWQ's clipped round to nearest. On FP4's grids, whose power-of-two scales leave AWQ's
range search little to choose, the combination beats both (BENCHMARKS.md, "FP4
weights").
"""

from __future__ import annotations

import torch

from llmopt.quant import awq, gptq
from llmopt.quant.spec import QuantSpec, Site
from llmopt.weights.qweight import QuantizedWeight


def quantize_layer(
    sites: list[Site], tensors: dict[str, torch.Tensor], spec: QuantSpec
) -> dict[str, QuantizedWeight]:
    """Fold the layer's AWQ scales (awq.fold_scales), then GPTQ each site."""
    scales = awq.fold_scales(sites, tensors, spec)
    out: dict[str, QuantizedWeight] = {}
    for site, s in zip(sites, scales, strict=True):
        h = site.stats.hessian()
        if s is not None:  # the inputs the scaled weights see are x / s
            h = h / (s[:, None] * s[None, :])
        out.update(gptq.round_site(site, tensors, spec, h))
    return out
