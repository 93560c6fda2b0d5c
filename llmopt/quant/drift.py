"""Drift correction for block-by-block calibration (the asymmetric calibration of
GPTAQ, Li et al., 2025).

Block by block (quant/sequential.py), a linear's inputs X~ (rows, in) come from the
partly quantized model and have drifted from the inputs X that the full-precision
model gives it. GPTQ and AWQ then fit Q X~ to W X~, keeping the drift that the blocks
before have added. What the model needs is Q X~ close to W X, and the weight that
gives it, unconstrained, is the least-squares fit

    W* = W X^T X~ (X~^T X~)^-1 = W + W D H^-1,   D = (X - X~)^T X~,  H = X~^T X~,

since ||W X - Q X~||^2 = ||(W* - Q) X~||^2 + a constant. The method then quantizes
W + alpha W D H^-1 on H as usual. The fit has `in` unknowns per output row from a few
thousand calibration rows, and the full step (alpha 1) overfits them, so the method
takes a fraction of it (spec.DEFAULT_DRIFT): a quarter for GPTQ, half for AWQ, whose
four times as many calibration rows bear a longer step (the sweeps are in
BENCHMARKS.md). D and H cost two (in, in) float64 sums per linear.
"""

from __future__ import annotations

import torch

from llmopt.quant.gptq import DAMP, damped_cholesky
from llmopt.quant.spec import Site


def correct_drift(
    site: Site, tensors: dict[str, torch.Tensor], alpha: float, damp: float = DAMP
) -> None:
    """Replace the site's weights in `tensors` by W + alpha W D H^-1 (see above), H
    damped by `damp` of its mean diagonal (a ridge); the site's stats must hold the
    drift D and the inputs' X~^T X~."""
    stats = site.stats
    if stats.drift is None or stats.xtx is None or alpha == 0:
        return
    w = site.fused(tensors).double()  # (out, in)
    lower = damped_cholesky(stats.xtx, damp)
    step = torch.cholesky_solve((w @ stats.drift).T, lower).T  # W D H^-1, (out, in)
    target = (w + alpha * step).float()
    sizes = [tensors[n].shape[0] for n in site.names]
    for name, part in zip(site.names, target.split(sizes), strict=True):
        tensors[name] = part
