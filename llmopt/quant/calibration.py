"""Calibration: run the full-precision model over text and keep, for the input of
every linear, what the quantization methods need.

- GPTQ needs the Hessian of the layer's squared error, H = 2 X^T X / n (in, in).
- AWQ needs the mean |x| per input channel, and X^T X to score candidate scales and
  ranges by the output error they cause (for an error d, ||X d||^2 = d^T X^T X d).

`collect` gathers them in one pass over the unquantized model (the inputs each layer
sees in full precision); quant/sequential.py gathers them block by block on the
partly quantized model.

The default text is the calibration half of `pydoc_data.topics` (llmopt/corpus.py);
the perplexity benchmark scores the other half, so calibration never sees the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from llmopt.models.scoring import Scorer


def calibration_windows(ids: list[int], num_tokens: int, window: int) -> list[list[int]]:
    """Consecutive windows of `window` tokens, `num_tokens` in all (fewer if short)."""
    count = max(1, min(num_tokens, len(ids)) // window)
    return [ids[i * window : (i + 1) * window] for i in range(count) if i * window < len(ids)]


@dataclass
class InputStats:
    """What one linear's inputs looked like over the calibration text."""

    xtx: torch.Tensor | None = None  # (in, in) float64 sum of x^T x
    abs_sum: torch.Tensor | None = None  # (in,) sum of |x|
    count: int = 0  # rows seen
    # (in, in) float64 sum of (x - x~)^T x~ over paired rows, x from the full-precision
    # model and x~ from the partly quantized one (quant/sequential.py), when kept
    drift: torch.Tensor | None = None

    def hessian(self) -> torch.Tensor:
        """(in, in) fp32: 2 X^T X / n."""
        assert self.xtx is not None, "no inputs recorded"
        return (2 * self.xtx / max(self.count, 1)).float()

    def abs_mean(self) -> torch.Tensor:
        assert self.abs_sum is not None
        return (self.abs_sum / max(self.count, 1)).float()

    def add_drift(self, x_full: torch.Tensor, x: torch.Tensor) -> None:
        """x_full, x: the same tokens' inputs (..., in) in the two models."""
        xd = x.detach().reshape(-1, x.shape[-1]).double()
        d = x_full.detach().reshape(-1, x.shape[-1]).double() - xd
        self.drift = d.T @ xd if self.drift is None else self.drift.addmm_(d.T, xd)

    def gram(self) -> torch.Tensor:
        """(in, in) fp32: X^T X."""
        assert self.xtx is not None, "no inputs recorded"
        return self.xtx.float()

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (T, in)
        xd = x.double()
        self.xtx = xd.T @ xd if self.xtx is None else self.xtx.addmm_(xd.T, xd)
        a = x.abs().sum(0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.count += x.shape[0]


@contextmanager
def _on_inputs(
    modules: dict[str, nn.Module], take: Callable[[str, torch.Tensor], None]
) -> Iterator[None]:
    """Call take(name, input) for every forward pass of `modules` run inside."""

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            take(name, args[0])

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recording(modules: dict[str, nn.Module]) -> Iterator[dict[str, InputStats]]:
    """Statistics of the inputs of `modules` over every forward pass run inside."""
    stats = {name: InputStats() for name in modules}
    with _on_inputs(modules, lambda name, x: stats[name].add(x)):
        yield stats


class _AllCaptured(Exception):
    """Raised out of a forward pass once `capturing(..., stop=True)` has every input."""


@contextmanager
def capturing(
    modules: dict[str, nn.Module], stop: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """The input of each of `modules` in the one forward pass run inside; with stop,
    the pass ends as soon as the last of them is taken (the rest of it is not run)."""
    got: dict[str, torch.Tensor] = {}

    def take(name: str, x: torch.Tensor) -> None:
        got[name] = x.detach().clone()
        if stop and len(got) == len(modules):
            raise _AllCaptured

    try:
        with _on_inputs(modules, take):
            yield got
    except _AllCaptured:
        pass


def collect(
    scorer: Scorer,
    modules: dict[str, nn.Module],
    windows: list[list[int]],
    progress: Callable[[], None] = lambda: None,
) -> dict[str, InputStats]:
    """Run every window through the model, recording the inputs of `modules`."""
    with recording(modules) as stats:
        for ids in windows:
            scorer.logits(ids)
            progress()
    return stats
