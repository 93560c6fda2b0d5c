"""Tensor parallelism's split of a model: which part of each weight, and of the KV
cache, a rank holds.

- q/k/v and gate/up are split by output rows: by heads, and by the MLP's width.
- o_proj and down_proj, `exact` (the default), by output rows: each rank gathers the
  whole input and computes its share of the outputs whole, with one rank's arithmetic
  (layers.ColumnGathered), so that the output is one rank's bit for bit, for 1.42x the
  bytes on a ring (BENCHMARKS.md). Megatron's way, by input columns on the same
  boundaries as q/k/v and gate/up: each rank's product is a partial sum of the full
  output (the all-reduce is layers.RowParallel).
- The embedding and the output projection are split by vocabulary rows, padded with
  zero rows to equal shares (the logits' gather needs equal sizes).
- KV heads go with their query heads. With more ranks than KV heads, each KV head is
  held by the ranks whose query heads read it (replicated).
- Norms are replicated.

Quantized weights are cut on their group boundaries (QuantizedWeight.columns), so no
rank re-quantizes anything; a split that would cut a group is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from llmopt.config import ModelConfig
from llmopt.errors import UsageError
from llmopt.weights.lazy import LazyWeights
from llmopt.weights.qweight import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


@dataclass(frozen=True)
class Shard:
    rank: int
    size: int
    exact: bool = False  # o_proj and down_proj by output rows (see the top)

    def part(self, n: int) -> range:
        """This rank's equal share of n (n % size == 0)."""
        per = n // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def kv_heads(self, num_kv: int) -> range:
        """This rank's KV heads: its share of them, or the one its query heads read
        when there are fewer KV heads than ranks."""
        if num_kv >= self.size:
            return self.part(num_kv)
        head = self.rank // (self.size // num_kv)
        return range(head, head + 1)

    def vocab(self, vocab: int) -> range:
        """This rank's vocabulary rows; the last share may run past the vocabulary."""
        per = -(-vocab // self.size)
        return range(self.rank * per, (self.rank + 1) * per)

    # What the loader asks of a part of a model (this, or a pipeline Stage).
    def check(self, cfg: ModelConfig) -> None:
        check_split(cfg, self.size, self.exact)

    def config(self, cfg: ModelConfig) -> ModelConfig:
        return local_config(cfg, self)

    def weights(self, full: Mapping[str, Weight], cfg: ModelConfig) -> LazyWeights:
        return ShardedWeights(full, cfg, self)


def check_split(cfg: ModelConfig, size: int, exact: bool = False) -> None:
    """Refuse, with what would work, a tensor-parallel size the model cannot take."""
    if size < 1:
        raise UsageError(f"--tensor-parallel-size must be at least 1, not {size}")
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    fits = [n for n in range(1, heads + 1) if _splits(cfg, n, exact)]
    if not _splits(cfg, size, exact):
        raise UsageError(
            f"{cfg.architecture} with {heads} query heads, {kv} KV heads, an MLP "
            f"{cfg.intermediate_size} wide and {cfg.hidden_size} hidden does not split "
            f"evenly over {size} ranks; --tensor-parallel-size can be "
            f"{', '.join(map(str, fits))}"
        )


def _splits(cfg: ModelConfig, n: int, exact: bool) -> bool:
    kv = cfg.num_kv_heads
    kv_ok = kv % n == 0 if n <= kv else n % kv == 0
    width_ok = cfg.intermediate_size % n == 0 and (not exact or cfg.hidden_size % n == 0)
    return cfg.num_heads % n == 0 and kv_ok and width_ok


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """The config of the model this rank builds: its heads, MLP width and vocabulary
    share (the hidden size and everything else as they are)."""
    return dataclasses.replace(
        cfg,
        num_heads=cfg.num_heads // shard.size,
        num_kv_heads=len(shard.kv_heads(cfg.num_kv_heads)),
        intermediate_size=cfg.intermediate_size // shard.size,
        vocab_size=len(shard.vocab(cfg.vocab_size)),
    )


class ShardedWeights(LazyWeights):
    """A model's weights (Hugging Face names) as one rank holds them: each cut from the
    full one when the builder reads it. A weight read under two names (a tied
    embedding and head) stays one object."""

    def __init__(self, full: Mapping[str, Weight], cfg: ModelConfig, shard: Shard) -> None:
        super().__init__({name: self._loader(name) for name in full}, full)
        self._full, self._cfg, self._shard = full, cfg, shard
        self._cut: dict[int, tuple[Weight, Weight]] = {}  # id(full weight) -> (it, cut)
        # Linears of another shape than the part's config gives them (models.llama's
        # build_model reads it): with `exact`, o_proj and down_proj, (out, in).
        self.linear_shapes: dict[str, tuple[int, int]] = {}
        if shard.exact:
            out = cfg.hidden_size // shard.size
            for i in range(cfg.num_layers):
                self.linear_shapes[f"layers.{i}.self_attn.o_proj"] = (
                    out,
                    cfg.num_heads * cfg.head_dim,
                )
                self.linear_shapes[f"layers.{i}.mlp.down_proj"] = (out, cfg.intermediate_size)

    def _loader(self, name: str) -> Callable[[], Weight]:
        return lambda: self._read(name)

    def _read(self, name: str) -> Weight:
        w = self._full[name]
        if id(w) not in self._cut:
            try:
                self._cut[id(w)] = (w, cut(name, w, self._cfg, self._shard))
            except ValueError as e:
                raise UsageError(
                    f"{name} does not split over {self._shard.size} ranks: {e}"
                ) from None
        return self._cut[id(w)][1]

    def forget(self) -> None:
        super().forget()
        self._cut.clear()


def cut(name: str, w: Weight, cfg: ModelConfig, shard: Shard) -> Weight:
    """Rank `shard`'s part of the weight `name` (see the module's docstring)."""
    d = cfg.head_dim
    if ".self_attn.q_proj." in name:
        return _rows(w, _scaled(shard.part(cfg.num_heads), d))
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return _rows(w, _scaled(shard.kv_heads(cfg.num_kv_heads), d))
    if ".mlp.gate_proj." in name or ".mlp.up_proj." in name:
        return _rows(w, shard.part(cfg.intermediate_size))
    if shard.exact and (".self_attn.o_proj." in name or ".mlp.down_proj." in name):
        return _rows(w, shard.part(cfg.hidden_size))
    if ".self_attn.o_proj." in name:
        return _columns(w, _scaled(shard.part(cfg.num_heads), d))
    if ".mlp.down_proj." in name:
        return _columns(w, shard.part(cfg.intermediate_size))
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return _rows(w, shard.vocab(cfg.vocab_size))
    return w  # norms


def _scaled(r: range, d: int) -> range:
    return range(r.start * d, r.stop * d)


def _rows(w: Weight, r: range) -> Weight:
    """Rows r of w, copied; rows past its end are zeros (a vocabulary's padding)."""
    n = w.shape[0]
    pad = max(0, r.stop - max(n, r.start))
    if isinstance(w, QuantizedWeight):
        part = w.map_rows(lambda t: t[r.start : r.stop].clone())
        if pad:
            zeros = w.map_rows(lambda t: t.new_zeros(pad, *t.shape[1:]))
            part = QuantizedWeight.cat([part, zeros])
        return part
    part = w[r.start : r.stop].clone()
    if pad:
        part = torch.cat([part, w.new_zeros(pad, *w.shape[1:])])
    return part


def _columns(w: Weight, r: range) -> Weight:
    if isinstance(w, QuantizedWeight):
        return w.columns(r.start, r.stop)
    return w[:, r.start : r.stop].clone()
