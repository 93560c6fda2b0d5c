"""Pipeline parallelism's split of a model: consecutive decoder layers per stage, each
stage with the KV cache of its own layers only.

The first stage (the driver's) embeds the tokens and projects the last stage's hidden
values onto the vocabulary; the stages after it drop the embedding and the output
projection once built (`strip`), and hold their layers and the final norm.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from llmopt import heap
from llmopt.config import ModelConfig
from llmopt.errors import UsageError
from llmopt.weights.lazy import LazyWeights
from llmopt.weights.qweight import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight
_LAYER = re.compile(r"(^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class Stage:
    index: int
    count: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    def layers(self, num_layers: int) -> range:
        """This stage's layers: an even split, the earlier stages one fewer where
        it is uneven."""
        return range(
            self.index * num_layers // self.count, (self.index + 1) * num_layers // self.count
        )

    def strip(self, model: nn.Module) -> None:
        """Drop what this stage never runs: a later stage's embedding and head."""
        if not self.first:
            model.embed_tokens = None
            model.lm_head = None
            heap.trim()

    def check(self, cfg: ModelConfig) -> None:
        if not 1 <= self.count <= cfg.num_layers:
            raise UsageError(
                f"--pipeline-parallel-size must be 1 to the model's {cfg.num_layers} layers, "
                f"not {self.count}"
            )

    def config(self, cfg: ModelConfig) -> ModelConfig:
        """The config of this stage's model: its layers alone (and their kinds)."""
        r = self.layers(cfg.num_layers)
        return dataclasses.replace(
            cfg, num_layers=len(r), layer_types=cfg.layer_types[r.start : r.stop]
        )

    def weights(self, full: Mapping[str, Weight], cfg: ModelConfig) -> LazyWeights:
        """This stage's weights, its layers renumbered from 0; the rest as they are."""
        r = self.layers(cfg.num_layers)
        names: dict[str, str] = {}
        for name in full:
            m = _LAYER.search(name)
            if m is None:
                names[name] = name
            elif int(m[2]) in r:
                local = f"{m[1]}layers.{int(m[2]) - r.start}."
                names[name[: m.start()] + local + name[m.end() :]] = name
        return LazyWeights({new: _reader(full, old) for new, old in names.items()}, full)


def _reader(full: Mapping[str, Weight], name: str) -> Callable[[], Weight]:
    return lambda: full[name]
