"""The layers that communicate under tensor parallelism, swapped into a model built
from its shard (shard.py): everything else in the model runs on its part unchanged.

Per token and layer, two all-reduces of (hidden,) activations (attention's output
projection and the MLP's down projection), and one at the embedding: the
communication the benchmarks measure against 2 x layers x hidden x bytes.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.distributed.allreduce import AllReduce
from llmopt.distributed.group import Ranks
from llmopt.distributed.shard import Shard
from llmopt.layers.embedding import QuantEmbedding


class RowParallel(nn.Module):
    """A linear split by input columns: each rank's product is a partial sum over its
    columns; the all-reduce gives every rank the full (N, out) output."""

    def __init__(self, inner: nn.Module, reduce: AllReduce) -> None:
        super().__init__()
        self.inner, self.reduce = inner, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (N, out): this rank's partial sum
        self.reduce(y)
        return y


class VocabParallelEmbedding(nn.Module):
    """A lookup table split by vocabulary rows: each rank writes the rows of the tokens
    in its share and zeros elsewhere; the all-reduce adds exact zeros, so every rank
    gets each token's row bit for bit."""

    def __init__(self, inner: nn.Module, first: int, reduce: AllReduce) -> None:
        super().__init__()
        self.inner, self.first, self.reduce = inner, first, reduce
        self.rows = _rows(inner)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first  # (N,)
        outside = (local < 0) | (local >= self.rows)
        x = self.inner(local.clamp(0, self.rows - 1))  # (N, hidden)
        x[outside] = 0
        self.reduce(x)
        return x


def _rows(table: nn.Module) -> int:
    if isinstance(table, QuantEmbedding):
        return table.table.out_features
    return table.weight.shape[0]


def parallelize(model: nn.Module, shard: Shard, ranks: Ranks) -> None:
    """Swap in the communicating layers of a model built from `shard`'s weights (a
    collective: every rank calls it)."""
    reduce = AllReduce(ranks)
    for layer in model.layers:
        layer.self_attn.o_proj = RowParallel(layer.self_attn.o_proj, reduce)
        layer.mlp.down_proj = RowParallel(layer.mlp.down_proj, reduce)
    first = shard.rank * model.config.vocab_size  # the local config's share
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, first, reduce)
