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
    for name in (n for site in sites for n in site.names):
        w = tensors[name].float()
        if spec.fp4:
            out[name] = quantize_fp4(w, spec.fp4)
        else:
            out[name] = quantize_rtn(
                w, spec.bits, spec.group_for(w.shape[1]), spec.sym, spec.float_zero
            )
    return out
