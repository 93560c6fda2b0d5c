"""The layers that communicate under tensor parallelism, swapped into a model built
from its shard (shard.py): everything else in the model runs on its part unchanged.

Per token and layer, two all-reduces of (hidden,) activations (attention's output
projection and the MLP's down projection), and one at the embedding: the
communication the benchmarks measure against 2 x layers x hidden x bytes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from llmopt.distributed.shard import Shard
from llmopt.layers.embedding import QuantEmbedding


class RowParallel(nn.Module):
    """A linear split by input columns: each rank's product is a partial sum over its
    columns; the all-reduce gives every rank the full (N, out) output."""

    def __init__(self, inner: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (N, out): this rank's partial sum
        dist.all_reduce(y, group=self.group)
        return y


class VocabParallelEmbedding(nn.Module):
    """A lookup table split by vocabulary rows: each rank writes the rows of the tokens
    in its share and zeros elsewhere; the all-reduce adds exact zeros, so every rank
    gets each token's row bit for bit."""

    def __init__(self, inner: nn.Module, first: int, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.inner, self.first, self.group = inner, first, group
        self.rows = _rows(inner)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first  # (N,)
        outside = (local < 0) | (local >= self.rows)
        x = self.inner(local.clamp(0, self.rows - 1))  # (N, hidden)
        x[outside] = 0
        dist.all_reduce(x, group=self.group)
        return x


def _rows(table: nn.Module) -> int:
    if isinstance(table, QuantEmbedding):
        return table.table.out_features
    return table.weight.shape[0]


def parallelize(model: nn.Module, shard: Shard, group: dist.ProcessGroup) -> None:
    """Swap in the communicating layers of a model built from `shard`'s weights."""
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, group)
    first = shard.rank * model.config.vocab_size  # the local config's share
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, first, group)
