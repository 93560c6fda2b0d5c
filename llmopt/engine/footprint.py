"""The bytes an engine holds on its device: its model's weights and its KV cache (a
draft model's too), what a server with several models counts against its memory
budget."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from llmopt.engine.engine import Engine
from llmopt.engine.runner import Runner
from llmopt.engine.spec.draft_model import DraftModelDrafter
from llmopt.layers.linear import Linear
from llmopt.layers.quant_linear import QuantLinear


def _weights(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    # What the kernels read is not always a parameter or a buffer: oneDNN's blocked
    # copy of an fp32 weight, the packed operands of a quantized one.
    for m in model.modules():
        if isinstance(m, Linear) and m.packed is not None:
            yield m.packed
        elif isinstance(m, QuantLinear):
            yield from (t for t in m.decode_operands() if t is not None)


def _tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Each tensor once, however many modules share it (a tied lm_head, an operand
    that is also a buffer)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        key = (t.data_ptr(), t.numel()) if t.layout == torch.strided else (id(t), 0)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def resident_bytes() -> int:
    """This process's resident memory now (Linux's /proc/self/statm), or its peak so far
    where that file is not there: what the start-up reports state beside held_bytes
    (the interpreter, torch, the tokenizer and the allocator's slack too)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def weight_bytes(model: nn.Module) -> int:
    """The bytes of a model's weights as its kernels hold them."""
    return _tensor_bytes(_weights(model))


def held_bytes(engine: Engine) -> int:
    """Weights plus KV cache, of the target model and of a draft model if any."""
    runners: list[Runner] = [engine.runner]
    if isinstance(engine.drafter, DraftModelDrafter):
        runners.append(engine.drafter.runner)
    return sum(weight_bytes(r.model) + r.cache.nbytes for r in runners)
