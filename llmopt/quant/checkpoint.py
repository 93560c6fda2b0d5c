"""Writing a quantized checkpoint: the packed tensors in one safetensors file, config.json
with the format's quantization_config, and the source model's tokenizer files.

The bit layouts themselves live in weights/layouts (the loader reads them back); what
config.json says about how a checkpoint was made is the producer's business, so it is
written here, from the QuantSpec.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llmopt.errors import ModelFormatError
from llmopt.quant.spec import QuantSpec
from llmopt.weights.layouts import layout_for
from llmopt.weights.qweight import QuantizedWeight

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    # A converted GGUF's native vocabulary, SentencePiece or byte-level (vocab/spm_file.py).
    "tokenizer.spm",
    "tokenizer.bpe",
)
# Dense tensors of a GPTQ/AWQ checkpoint are fp16, what those tools' kernels expect.
DENSE_DTYPE = {"llmopt": torch.bfloat16, "gptq": torch.float16, "awq": torch.float16}


def _native_config(spec: QuantSpec) -> dict[str, Any]:
    return {
        "quant_method": "llmopt",
        "bits": spec.bits,
        "group_size": spec.group_size,  # 0: one group per row
        "sym": spec.sym,
        "float_zero": spec.float_zero,  # 4-bit linears store qmins, not qzeros
        "method": spec.method,
        "act_order": spec.act_order,
        "static_groups": spec.static_groups,
        "sequential": spec.sequential,
        "drift_correction": spec.drift,
        "damp": spec.damp,  # GPTQ's and drift correction's (spec.DEFAULT_DAMP)
        "lm_head": spec.lm_head,
        "lm_head_bits": spec.head_bits,  # may differ from "bits" (see loader/quantized.py)
        "embed_bits": spec.embed_bits,  # 0: the embedding is dense
        "version": 1,
        **({"fp4": spec.fp4} if spec.fp4 else {}),  # FP4: GGUF's blocks (weights/layouts)
        # Linears in int8 (one scale per row) beside the 4-bit ones, by weight prefix.
        **({"int8_linears": [_prefix(n) for n in spec.int8_linears]} if spec.int8_linears else {}),
    }


def _prefix(weight: str) -> str:
    return weight.removesuffix(".weight")


def _gptq_config(spec: QuantSpec) -> dict[str, Any]:
    if spec.head_bits not in (0, spec.bits) or spec.embed_bits or spec.int8_linears:
        raise ModelFormatError(
            "the GPTQ layout quantizes the output projection with the model's bits, "
            "and not the embedding"
        )
    return {
        "quant_method": "gptq",
        "bits": spec.bits,
        "group_size": spec.group_size or -1,  # -1: one group per row, GPTQ's convention
        "desc_act": spec.act_order,
        "sym": spec.sym,
        "true_sequential": False,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq",
        "lm_head": spec.lm_head,
        "quantizer": [f"llmopt:{spec.method}"],
    }


def _awq_config(spec: QuantSpec) -> dict[str, Any]:
    if (
        spec.bits != 4
        or spec.sym
        or spec.act_order
        or spec.lm_head
        or spec.embed_bits
        or spec.int8_linears
    ):
        raise ModelFormatError(
            "the AWQ layout holds 4-bit weights with zero points, without act-order, "
            "and leaves the output projection and the embedding unquantized"
        )
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": spec.group_size,
        "zero_point": True,
        "version": "gemm",
        "quantizer": f"llmopt:{spec.method}",
    }


CONFIG_WRITERS: dict[str, Callable[[QuantSpec], dict[str, Any]]] = {
    "llmopt": _native_config,
    "gptq": _gptq_config,
    "awq": _awq_config,
}


def quantization_config(fmt: str, spec: QuantSpec) -> dict[str, Any]:
    """config.json's quantization_config for a checkpoint of layout `fmt` made by `spec`;
    refuses a spec the layout cannot hold."""
    layout_for(fmt)  # the loader's error for an unknown layout
    return CONFIG_WRITERS[fmt](spec)


def write_checkpoint(
    folder: Path, tmp: Path, raw_cfg: dict, weights: dict, spec: QuantSpec, fmt: str
) -> dict[str, int]:
    """Write the checkpoint into `tmp`; return the bytes stored for each weight (a
    quantized one's codes, scales and zero points together), by its name."""
    from safetensors.torch import save_file

    layout = layout_for(fmt)
    dense = DENSE_DTYPE[fmt]
    flat: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedWeight):
            prefix = name.removesuffix(".weight")
            packed = layout.pack(w)
            sizes[name] = sum(t.numel() * t.itemsize for t in packed.values())
            flat.update({f"{prefix}.{k}": v for k, v in packed.items()})
        else:
            flat[name] = w.to(dense).contiguous()
            sizes[name] = flat[name].numel() * dense.itemsize
    save_file(flat, str(tmp / "model.safetensors"), {"format": "pt"})
    qcfg = quantization_config(fmt, spec)
    cfg = {**raw_cfg, "quantization_config": qcfg, "torch_dtype": str(dense).removeprefix("torch.")}
    if spec.lm_head:
        cfg["tie_word_embeddings"] = False  # the quantized head is a copy of its own
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in TOKENIZER_FILES:
        if (folder / f).is_file():
            shutil.copy2(folder / f, tmp / f)
    return sizes
