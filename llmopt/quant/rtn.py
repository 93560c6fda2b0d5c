"""Round-to-nearest: each group's min/max grid (FP4: the scale of least error per
block), no calibration. The baseline every other method must beat."""

from __future__ import annotations

import torch

from llmopt.quant.spec import QuantSpec, Site
from llmopt.weights.fp4 import quantize_fp4
from llmopt.weights.qweight import QuantizedWeight, quantize_rtn


def quantize_layer(
    sites: list[Site], tensors: dict[str, torch.Tensor], spec: QuantSpec
) -> dict[str, QuantizedWeight]:
    out = {}
    for site in sites:
        grid = spec.site_spec(site)
        for name in site.names:
            w = tensors[name].float()
            if grid.fp4:
                out[name] = quantize_fp4(w, grid.fp4)
            else:
                out[name] = quantize_rtn(
                    w, grid.bits, grid.group_for(w.shape[1]), grid.sym, grid.float_zero
                )
    return out
