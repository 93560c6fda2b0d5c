"""A GGUF file's tensors as the model's weights: GGUF names to Hugging Face names,
Llama's q/k row order undone, each tensor dequantized to fp32 or, for the linears and
the embedding of a type the int kernels run, kept in its quantized blocks.

Parsing a GGUF's metadata is slow (SmolLM2's 49,152-token vocabulary: 7 s in the
`gguf` reader), so the conversion cache keeps an index of the tensors (name, type,
shape, byte range); later loads map the file and slice it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from llmopt.atomic import atomic_file
from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError
from llmopt.loader.dequant import dequantize, quantized_weight
from llmopt.weights.ggml_types import GGMLType
from llmopt.weights.gguf_blocks import BLOCKS, CODEBOOKS
from llmopt.weights.lazy import LazyWeights
from llmopt.weights.qweight import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight
INDEX = "gguf_tensors.json"  # in the conversion cache folder

# GGUF tensor name -> Hugging Face name; {i} is the block index (the exporter reads
# it the other way round).
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
}
# Architectures whose Hugging Face names differ: Gemma 3 normalizes attention's output
# and the MLP's output too, and calls the norm before the MLP (GGUF's ffn_norm, Llama's
# post_attention_layernorm) pre_feedforward_layernorm.
ARCH_HF_NAMES = {
    "gemma3": {
        "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
    },
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# llama.cpp stores Llama q/k rows interleaved per rotary pair; these architectures
# need the permutation undone to get the rotate-half layout back.
PERMUTED_QK = ("llama", "mistral")
# Gemma's norms multiply by 1 + w and its checkpoints store w; llama.cpp's converter
# stores 1 + w. Hugging Face names get Hugging Face values: the one is taken off again.
NORMS_PLUS_ONE = ("gemma3",)


class Record(NamedTuple):
    """One tensor of the file: its GGUF name, GGML type, logical shape (rows first)
    and how to get its raw bytes."""

    name: str
    qtype: int
    shape: tuple[int, ...]
    read: Callable[[int, int | None], np.ndarray]  # (start, size or all) -> its bytes


def records_of(reader: Any) -> list[Record]:
    """The tensors of a gguf.GGUFReader."""
    return [
        Record(
            t.name,
            int(t.tensor_type),
            tuple(int(n) for n in reversed(t.shape)),  # GGUF lists dims fastest-first
            partial(_slice, t.data.view(np.uint8).reshape(-1)),
        )
        for t in reader.tensors
    ]


def write_index(reader: Any, arch: str, path: Path) -> None:
    """The tensor table of a file (its arch, and per tensor name/type/shape/bytes)."""
    entries = [
        {
            "name": t.name,
            "type": int(t.tensor_type),
            "shape": [int(n) for n in reversed(t.shape)],
            "offset": int(t.data_offset),
            "nbytes": int(t.n_bytes),
        }
        for t in reader.tensors
    ]
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"architecture": arch, "tensors": entries}))


def load_index(path: Path) -> dict[str, Any]:
    """The conversion cache's index of a GGUF file's tensors (write_index's JSON)."""
    return json.loads(path.read_text())


def has_kept_blocks(index: dict[str, Any]) -> bool:
    """Whether the file an index describes has block matrices of a type the int kernels
    run (weights/gguf_blocks.BLOCKS)."""
    kept = {int(t) for t in BLOCKS}
    return any(
        e["name"].startswith("blk.") and len(e["shape"]) == 2 and e["type"] in kept
        for e in index["tensors"]
    )


def read_index(gguf: Path, index: dict[str, Any]) -> tuple[str, list[Record]]:
    """The file's tensors through its index, each read from the file when asked for:
    read, not memory-mapped, so that the file's pages are the page cache's and a
    process holds only what it decoded (a mapping touched whole counts in its memory
    until the last view of it goes)."""
    size = gguf.stat().st_size
    records = []
    for e in index["tensors"]:
        if e["offset"] + e["nbytes"] > size:
            raise ModelFormatError(f"{gguf.name} is shorter than its tensor table; pull it again")
        read = partial(_read, gguf, e["offset"], e["nbytes"])
        records.append(Record(e["name"], e["type"], tuple(e["shape"]), read))
    return index["architecture"], records


def _slice(data: np.ndarray, start: int = 0, size: int | None = None) -> np.ndarray:
    return data[start : None if size is None else start + size]


def _read(
    path: Path, offset: int, nbytes: int, start: int = 0, size: int | None = None
) -> np.ndarray:
    """`size` bytes (default: to the end) from `start` of the tensor at offset..+nbytes."""
    count = nbytes - start if size is None else size
    return np.fromfile(path, np.uint8, count, offset=offset + start)


def hf_name(name: str, arch: str) -> str | None:
    m = _BLOCK.match(name)
    key = _BLOCK.sub("blk.{i}.", name) if m else name
    target = ARCH_HF_NAMES.get(arch, {}).get(key) or HF_NAMES.get(key)
    return target.format(i=m.group(1)) if (target and m) else target


def unpermute(w: Weight, heads: int) -> Weight:
    # (heads * D, ...) with rows ordered [head, half, pair] -> [head, pair, half]; a
    # quantized weight's codes, scales and zeros are rows alike.
    if isinstance(w, QuantizedWeight):
        return w.map_rows(lambda t: unpermute(t, heads))  # type: ignore[arg-type, return-value]
    return (
        w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def hf_weights(
    records: list[Record], cfg: ModelConfig, arch: str, source: str, keep_quantized: bool
) -> LazyWeights:
    """All weights under Hugging Face names, each decoded when first read: dequantized to
    fp32, or with keep_quantized, for the linears and the embedding stored in a type the
    int kernels run (gguf_blocks.BLOCKS), QuantizedWeights as stored; a tied output
    projection is then the embedding's own blocks, under `lm_head.weight` too."""
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    # name -> (bits, group, codebook) where kept
    grids: dict[str, tuple[int, int, str | None] | None] = {}
    loaders: dict[str, Callable[[], Weight]] = {}
    scales = {  # a weight's GGUF name -> its tensor scale's record (NVFP4's, as llama.cpp)
        r.name.removesuffix(".scale") + ".weight": r
        for r in records
        if r.name.endswith(".scale") and r.shape == (1,) and r.qtype == GGMLType.F32
    }
    for r in records:
        if r.name.removesuffix(".scale") + ".weight" in scales:
            continue  # applied to its weight
        name = hf_name(r.name, arch)
        if name is None:
            raise ModelFormatError(f"{source}: unexpected tensor '{r.name}'")
        qtype = GGMLType(r.qtype)
        matrix = name.endswith(("proj.weight", "lm_head.weight", "embed_tokens.weight"))
        keep = keep_quantized and qtype in BLOCKS and len(r.shape) == 2 and matrix
        grids[name] = (*BLOCKS[qtype][2:], CODEBOOKS.get(qtype)) if keep else None
        kind = r.name.split(".")[2] if r.name.startswith("blk.") else ""
        heads_of = heads[kind] if arch in PERMUTED_QK and kind in heads else None
        # llama.cpp stores these architectures' norms as 1 + w; the model adds the 1
        plus_one = arch in NORMS_PLUS_ONE and name.endswith("norm.weight")
        scale = scales.get(r.name)
        loaders[name] = partial(_decode, r, qtype, keep, heads_of, plus_one, source, scale)
    if grids.get("model.embed_tokens.weight") and cfg.tie_word_embeddings:
        loaders["lm_head.weight"] = lambda: weights["model.embed_tokens.weight"]
    if keep_quantized:
        _common_grids(loaders, grids, cfg.num_layers)
    weights = LazyWeights(loaders)
    return weights


def _decode(
    r: Record,
    qtype: Any,
    keep: bool,
    heads: int | None,
    plus_one: bool,
    source: str,
    scale: Record | None = None,
) -> Weight:
    """One tensor from the file: kept in its blocks or dequantized, times its tensor
    scale (the `.scale` beside it, which llama.cpp multiplies the product by), the q/k
    row order undone where the architecture permutes it (heads), a norm stored as
    1 + w back to w (plus_one)."""
    try:
        if keep:  # read a few MB at a time
            w: Weight = quantized_weight(r.read, qtype, (r.shape[0], r.shape[1]))
        else:
            w = dequantize(r.read(0, None), qtype, r.shape)
        t = 1.0 if scale is None else float(scale.read(0, None).view(np.float32)[0])
    except (ValueError, RuntimeError) as e:
        raise ModelFormatError(
            f"{source}: tensor '{r.name}' is damaged ({e}); pull the file again"
        ) from e
    if t != 1.0:
        # (a K-quant's own factors no longer give the scales: dropped)
        w = replace(w, scale=w.scale * t, kquant=None) if isinstance(w, QuantizedWeight) else w * t
    if heads is not None:
        w = unpermute(w, heads)
    return w - 1 if plus_one and isinstance(w, torch.Tensor) else w


def _common_grids(
    loaders: dict[str, Callable[[], Weight]],
    grids: dict[str, tuple[int, int, str | None] | None],
    layers: int,
) -> None:
    """The model fuses q/k/v and gate/up into one matrix each. Where a file stores the
    parts of one on different grids, their loaders put them on the finest (most bits,
    smallest group: the same weights; 8 bits where their codebooks differ, which int8
    holds all of); where only some are kept, all dequantize."""
    fused = (("self_attn.", ("q", "k", "v")), ("mlp.", ("gate", "up")))
    for i in range(layers):
        for sub, parts in fused:
            names = [f"model.layers.{i}.{sub}{p}_proj.weight" for p in parts]
            kept = [g for n in names if (g := grids[n]) is not None]
            if not kept or (len(kept) == len(names) and len(set(kept)) == 1):
                continue
            bits, group = max(b for b, *_ in kept), min(g for _, g, _ in kept)
            if len({c for *_, c in kept}) > 1:
                bits = 8
            regrid = len(kept) == len(names) and all(g % group == 0 for _, g, _ in kept)
            for n in names:
                if grids[n] is not None:
                    loaders[n] = partial(_on_grid, loaders[n], bits, group, regrid)


def _on_grid(load: Callable[[], Weight], bits: int, group: int, regrid: bool) -> Weight:
    w = load()
    assert isinstance(w, QuantizedWeight)
    return w.regrid(bits, group) if regrid else w.dequantize()
