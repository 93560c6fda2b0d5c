"""The layers that communicate under tensor parallelism, swapped into a model built
from its shard (shard.py): everything else in the model runs on its part unchanged.

Megatron's split (RowParallel) all-reduces twice a token and layer, (hidden,) values
after attention's output projection and the MLP's down projection: the communication
the benchmarks measure against 2 x layers x hidden x bytes. The exact split (the
default, ColumnGathered) all-gathers four times instead: attention's output and the
MLP's activation (their widths), and each projection's output (hidden). Both
all-reduce once at the embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.distributed.collectives import Collectives
from llmopt.distributed.group import Ranks
from llmopt.distributed.shard import Shard


class RowParallel(nn.Module):
    """A linear split by input columns: each rank's product is a partial sum over its
    columns; the all-reduce gives every rank the full (N, out) output."""

    def __init__(self, inner: nn.Module, reduce: Collectives) -> None:
        super().__init__()
        self.inner, self.reduce = inner, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)  # (N, out): this rank's partial sum
        self.reduce(y)
        return y


class ColumnGathered(nn.Module):
    """A linear split by output rows whose input is split by columns: each rank gathers
    the whole (N, in) input, computes its (N, out / ranks) outputs whole, and gathers
    everyone's: every output is one rank's full-width product, bit for bit."""

    def __init__(self, inner: nn.Module, collectives: Collectives) -> None:
        super().__init__()
        self.inner, self.collectives = inner, collectives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = self.collectives.gather(x)  # (N, in): every rank's columns, in order
        return self.collectives.gather(self.inner(full))  # (N, out)


class VocabParallelEmbedding(nn.Module):
    """A lookup table split by vocabulary rows: each rank writes the rows of the tokens
    in its share and zeros elsewhere; the all-reduce adds exact zeros, so every rank
    gets each token's row bit for bit."""

    def __init__(self, inner: nn.Module, first: int, rows: int, reduce: Collectives) -> None:
        super().__init__()
        self.inner, self.first, self.rows, self.reduce = inner, first, rows, reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first  # (N,)
        outside = (local < 0) | (local >= self.rows)
        x = self.inner(local.clamp(0, self.rows - 1))  # (N, hidden)
        x[outside] = 0
        self.reduce(x)
        return x


def parallelize(model: nn.Module, shard: Shard, ranks: Ranks) -> None:
    """Swap in the communicating layers of a model built from `shard`'s weights (a
    collective: every rank calls it)."""
    collectives = Collectives(ranks)
    split = ColumnGathered if shard.exact else RowParallel
    for layer in model.layers:
        layer.self_attn.o_proj = split(layer.self_attn.o_proj, collectives)
        layer.mlp.down_proj = split(layer.mlp.down_proj, collectives)
    rows = model.config.vocab_size  # the local config's share
    model.embed_tokens = VocabParallelEmbedding(
        model.embed_tokens, shard.rank * rows, rows, collectives
    )
