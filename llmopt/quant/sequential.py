"""Layer-by-layer quantization: decoder block i is calibrated on the inputs that blocks
0 .. i-1, already quantized, produce (the order of GPTQ's reference implementation).

A one-pass calibration (calibration.collect) gives every block the inputs of the
full-precision model, so no block's method sees, or can absorb, the error the
quantized blocks before it add; in a 30-block model of 135M parameters that error
compounds. Here the calibration windows' hidden states are kept between blocks
(windows x tokens x hidden, fp32: 38 MB for 16 x 512 x 576 with the residual stream)
and each block runs on them to record its linears' inputs, is quantized (its weights
dequantized into the fp32 model, with any norm AWQ rescaled), and runs again to make
the next block's inputs: about two forward passes of the calibration text.

With drift correction (quant/drift.py, on by default block by block) a second stream
of hidden states, the full-precision model's, runs alongside, and each linear's
target is refit to map its drifted inputs to the full-precision outputs; the block is
then quantized linear by linear ("true sequential": o_proj calibrated on the output
of the quantized q/k/v, gate/up on the quantized attention's, down_proj on the
quantized gate/up's), so that each linear also corrects the linears before it in its
own block. Linear by linear goes with the correction only: fitting each linear to the
partly quantized model's own outputs bakes the earlier linears' error in, where the
full-precision outputs undo some of it.

All windows have the same length and start at position 0, so one set of attention
inputs (rotary tables, slots, metadata) serves every window: a block's call writes a
window's keys into those slots and reads only them back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn

from llmopt.config import ModelConfig
from llmopt.layers.linear import Linear
from llmopt.models.scoring import Scorer
from llmopt.quant import awq, gptq
from llmopt.quant.calibration import InputStats, capturing, recording
from llmopt.quant.drift import correct_drift
from llmopt.quant.spec import CALIBRATED, FOLDING, QuantSpec, head_site, layer_sites
from llmopt.weights.qweight import QuantizedWeight

State = tuple[torch.Tensor, torch.Tensor | None]  # a block's input: (x, residual)


def quantize_sequential(
    scorer: Scorer,
    cfg: ModelConfig,
    tensors: dict[str, torch.Tensor],
    spec: QuantSpec,
    method: ModuleType,
    windows: list[list[int]],
    on_layer: Callable[[], None] = lambda: None,
) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every decoder linear (and the output projection if spec.lm_head, already untied
    in `tensors`) quantized with `method`, block by block; `tensors` (Hugging Face
    names, fp32) are the weights the scorer's fp32 model was loaded from, and AWQ may
    rescale them in place."""
    model, cache = scorer.model, scorer.cache
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    inputs = scorer.inputs(windows[0])
    with torch.inference_mode():
        meta = inputs.meta
        rope = model.rope_tables(inputs.positions, torch.float32)  # each layer's (cos, sin)
        device = inputs.input_ids.device
        states: list[State] = [
            (model.embed(torch.tensor(ids, device=device)), None) for ids in windows
        ]
        # The full-precision model's states, where drift correction needs them.
        full: list[State] | None = list(states) if spec.drift > 0 else None
        for i, block in enumerate(model.layers):
            names = {f"layers.{i}.{n}": block.get_submodule(n) for n in CALIBRATED}

            def run(state: State, i: int = i, block: nn.Module = block) -> State:
                # Blocks add into the residual stream in place: each call gets copies.
                x, r = state
                return block(x.clone(), None if r is None else r.clone(), *rope[i],
                             cache.layers[i], meta)  # fmt: skip

            if full is None:
                with recording(names) as stats:
                    for state in states:
                        run(state)
                out.update(method.quantize_layer(layer_sites(cfg, stats, i), tensors, spec))
                _load_block(model, cfg, i, tensors, out)
            else:
                full = _quantize_block_with_drift(
                    model, cfg, i, names, run, states, full, tensors, spec, method,
                    out,
                )  # fmt: skip
            states = [run(state) for state in states]
            on_layer()
        if spec.lm_head:
            head = InputStats()
            for x, r in states:
                head.add(model.norm(x, r))
            out.update(method.quantize_layer([head_site(cfg, head)], tensors, spec.head_spec()))
            on_layer()
    return out


def _quantize_block_with_drift(
    model: nn.Module,
    cfg: ModelConfig,
    i: int,
    names: dict[str, nn.Module],
    run: Callable[[State], State],
    states: list[State],
    full: list[State],
    tensors: dict[str, torch.Tensor],
    spec: QuantSpec,
    method: ModuleType,
    out: dict[str, torch.Tensor | QuantizedWeight],
) -> list[State]:
    """Block i quantized linear by linear (o_proj calibrated on the quantized q/k/v's
    output, and so on), each linear's target corrected for its inputs' drift
    (quant/drift.py); the full-precision states after the block returned.

    AWQ (and awq-gptq) first searches and folds the block's scales on the block's
    inputs together (a site's scale may fold into another site's weight: down_proj's
    into up_proj's rows), as awq.quantize_layer does; each site is then rounded (AWQ:
    clipped and rounded; awq-gptq: GPTQ) on its own recorded inputs, which the folded
    scales have divided."""
    wants, full = _full_precision_inputs(names, run, full)
    scales: list[torch.Tensor | None] = [None] * len(names)
    if spec.method in FOLDING:
        # The scale search reads the inputs' X^T X and magnitudes only, not the drift.
        with recording(names) as stats:
            for state in states:
                run(state)
        scales = awq.fold_scales(layer_sites(cfg, stats, i), tensors, spec)
        _load_block(model, cfg, i, tensors, out)
    for k, (name, s) in enumerate(zip(names, scales, strict=True)):
        # The full-precision inputs as the scaled weights see them (x / s).
        want = [{name: w[name] if s is None else w[name] / s} for w in wants]
        site = layer_sites(cfg, _drifted_stats({name: names[name]}, run, states, want), i)[k]
        correct_drift(site, tensors, spec.drift, spec.damp)
        # The recorded inputs are already x / s: the rounding reads them as they are.
        if spec.method == "awq":
            out.update(awq.round_site(site, tensors, spec, site.stats.gram()))
        elif spec.method == "awq-gptq":
            out.update(gptq.round_site(site, tensors, spec, site.stats.hessian()))
        else:
            out.update(method.quantize_layer([site], tensors, spec))
        _load_block(model, cfg, i, tensors, out)
    return full


def _full_precision_inputs(
    names: dict[str, nn.Module], run: Callable[[State], State], full: list[State]
) -> tuple[list[dict[str, torch.Tensor]], list[State]]:
    """Per window, the inputs of a block's linears in the full-precision model (its
    weights still dense), and that model's states after the block."""
    wants, after = [], []
    for state in full:
        with capturing(names) as want:
            after.append(run(state))
        wants.append(want)
    return wants, after


def _drifted_stats(
    modules: dict[str, nn.Module],
    run: Callable[[State], State],
    states: list[State],
    wants: list[dict[str, torch.Tensor]],
) -> defaultdict[str, InputStats]:
    """Input statistics of `modules` on the partly quantized model's states, with each
    input's drift from the full-precision model's (quant/drift.py); empty statistics
    for any other name."""
    stats: defaultdict[str, InputStats] = defaultdict(InputStats)
    for state, want in zip(states, wants, strict=True):
        with capturing(modules, stop=True) as got:  # the rest of the block is not needed
            run(state)
        for name, x in got.items():
            stats[name].add(x)
            stats[name].add_drift(want[name], x)
    return stats


def _load_block(
    model: nn.Module,
    cfg: ModelConfig,
    i: int,
    tensors: dict[str, torch.Tensor],
    quantized: dict[str, torch.Tensor | QuantizedWeight],
) -> None:
    """Block i of the fp32 model takes its quantized weights, dequantized, and the
    current values of its other tensors (norms that AWQ rescaled), mapped as the model
    maps them (Gemma's norms: 1 + w)."""
    prefix = f"model.layers.{i}."
    dense = {
        name: w.dequantize() if isinstance(w, QuantizedWeight) else w
        for name, w in {**tensors, **quantized}.items()
        if name.startswith(prefix)
    }
    for name, w in model.hf_layer(cfg, dense, i).items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        if isinstance(module, Linear) and attr == "weight":
            repack = module.packed is not None
            module.weight = nn.Parameter(w.float().contiguous(), requires_grad=False)
            module.packed = None
            if repack:  # fp32 CPU weights live in oneDNN's layout (layers/linear.py)
                module.prepack(keep_dense=False)
        else:
            getattr(module, attr).copy_(w)
