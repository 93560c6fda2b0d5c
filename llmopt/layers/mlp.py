"""SwiGLU feed-forward block."""

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.layers.linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.intermediate = intermediate
        # gate and up fused into one (2I, hidden) weight: one matmul instead of two.
        self.gate_up_proj = Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)  # each (T, I)
        return self.down_proj(F.silu(gate) * up)
