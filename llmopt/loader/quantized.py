"""Quantized checkpoints (ours, GPTQ, AWQ): the packed tensors of each linear back
to one QuantizedWeight under the linear's Hugging Face weight name."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError
from llmopt.weights.layouts import layout_for
from llmopt.weights.qweight import QuantizedWeight

Weights = dict[str, torch.Tensor | QuantizedWeight]


def unpack_checkpoint(tensors: dict[str, torch.Tensor], qcfg: dict[str, Any]) -> Weights:
    """`<linear>.qweight` and its siblings -> `<linear>.weight`: QuantizedWeight."""
    layout = layout_for(str(qcfg.get("quant_method", "")))
    prefixes = [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]
    if not prefixes:
        raise ModelFormatError("config.json declares quantization but no tensor is quantized")
    out: Weights = dict(tensors)
    # Ours may hold the output projection, the embedding and some linears at other bits
    # than the blocks (int8 beside int4 or FP4).
    bits = {
        "lm_head": qcfg.get("lm_head_bits") or qcfg.get("bits"),
        "model.embed_tokens": qcfg.get("embed_bits") or qcfg.get("bits"),
        **dict.fromkeys(qcfg.get("int8_linears") or (), 8),
    }
    for prefix in prefixes:
        parts = {}
        for suffix in layout.SUFFIXES:
            t = out.pop(f"{prefix}.{suffix}", None)
            if t is not None:
                parts[suffix] = t
        cfg = qcfg | {"bits": bits[prefix]} if prefix in bits else qcfg
        required = getattr(layout, "required", lambda _: ("qweight", "scales", "qzeros"))
        missing = [s for s in required(cfg) if s not in parts]
        if missing:
            raise ModelFormatError(f"quantized weight {prefix} lacks {', '.join(missing)}")
        try:
            out[f"{prefix}.weight"] = layout.unpack(parts, cfg)
        except (RuntimeError, ValueError) as e:
            raise ModelFormatError(f"quantized weight {prefix} is malformed: {e}") from e
    return out


def tie_quantized_head(weights: Weights, cfg: ModelConfig) -> ModelConfig:
    """A tied output projection over a quantized embedding is the embedding's own
    QuantizedWeight under `lm_head.weight` too (the model builds one QuantLinear for
    both: lookups decode its rows, the head runs it on the int kernel); the config then
    says untied, as the model has a head of its own to load."""
    embed = weights.get("model.embed_tokens.weight")
    if not cfg.tie_word_embeddings or not isinstance(embed, QuantizedWeight):
        return cfg
    weights["lm_head.weight"] = embed
    return replace(cfg, tie_word_embeddings=False)
