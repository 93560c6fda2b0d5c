"""Token embedding tables: dense, or quantized as a GGUF file stores them."""

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.layers.quant_linear import QuantLinear


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


class QuantEmbedding(nn.Module):
    """A (vocab, hidden) table kept in its quantized blocks, each step decoding only the
    rows it looks up: a GGUF file's embedding (Gemma 3's is 262,144 x 640) stays the
    size it has on disk instead of four times that in fp32. A tied output projection is
    the same QuantLinear."""

    def __init__(self, table: QuantLinear) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)  # (T,) -> (T, hidden)
