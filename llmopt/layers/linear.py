"""Dense linear layer; the seam where quantized weight formats plug in later."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T (+ b) with W: (out, in).

    No random initialisation (weights always come from a checkpoint): nn.Linear's
    init on the meta device costs about 1.5 s of start-up for a 30-layer model.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)
