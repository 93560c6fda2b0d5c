"""Token embedding table."""

import torch
import torch.nn.functional as F
from torch import nn


class Embedding(nn.Module):
    """A (vocab, hidden) lookup table.

    Unlike nn.Embedding it does no random initialisation: weights always come from a
    checkpoint, and initialising on the meta device pulls in torch._dynamo (about 2 s
    of start-up).
    """

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab, hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # (T,) -> (T, hidden)
