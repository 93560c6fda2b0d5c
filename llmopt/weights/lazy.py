"""Weights decoded when the model builder reads them, and dropped once it has its copy.

A GGUF file's linears are decoded into codes of a byte each, then packed by their
layers to half that or less. Decoding every tensor before building (a dict of them)
holds the whole model twice over at the peak; decoding each on first read and
forgetting it when its layer is built holds one layer's worth beside the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from llmopt.weights.qweight import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight


class LazyWeights(Mapping[str, Weight]):
    """name -> weight, each made by its loader on first read and kept until `forget`
    (so that a name read twice in one part, a tied embedding and head, is one object)."""

    def __init__(
        self,
        loaders: dict[str, Callable[[], Weight]],
        upstream: Mapping[str, Weight] | None = None,  # what the loaders read, if lazy too
    ) -> None:
        self._loaders = loaders
        self._made: dict[str, Weight] = {}
        self._upstream = upstream

    def __getitem__(self, name: str) -> Weight:
        if name not in self._made:
            self._made[name] = self._loaders[name]()
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def forget(self) -> None:
        """Drop the weights made so far (the builder has its own copies of them), and
        those of the mapping they were made from."""
        self._made.clear()
        if self._upstream is not None:
            forget(self._upstream)


def forget(weights: Mapping[str, Weight]) -> None:
    """LazyWeights.forget where the weights are lazy; a plain dict is its owner's."""
    if isinstance(weights, LazyWeights):
        weights.forget()
