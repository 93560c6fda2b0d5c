"""Export a Hugging Face Llama-family folder to a GGUF file that llama.cpp runs.

Two routes, by quantization type:
- F32, F16, BF16, Q8_0, Q4_0, Q4_1 are written here with the `gguf` package, one
  tensor in memory at a time; MXFP4 and NVFP4 too, their blocks from llmopt's FP4
  rounding (the scale of least error per block, weights/fp4.py) rather than the
  package's rule, and each NVFP4 weight's tensor scale beside it as llama.cpp reads it
  (`blk.0.attn_q.scale`, F32, one element).
- K-quants and the other llama.cpp types: a lossless GGUF (in the weights' own
  dtype) goes to a temporary file, then llama.cpp's quantizer (through
  llama-cpp-python) picks per-tensor types, e.g. Q6_K for some ffn_down in Q4_K_M.

A calibrated GGUF (GPTQ or AWQ on Q4_0's, Q4_1's, MXFP4's or NVFP4's grid) starts from an
llmopt checkpoint whose linears are already on the type's grid: `export_checkpoint`
writes their codes as they are (weights/gguf_blocks.encode) and rounds only what the
checkpoint keeps dense (the embedding, to Q8_0 as above).
"""

from __future__ import annotations

import ctypes
import re
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGUFWriter, LlamaFileType, RopeScalingType
from gguf import GGMLQuantizationType as Q
from gguf.quants import quant_shape_to_byte_shape, quantize

from llmopt.atomic import atomic_file
from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError, UsageError
from llmopt.layers.rotary import inv_frequencies
from llmopt.loader.gguf_weights import HF_NAMES
from llmopt.loader.hf import read_config, read_tensors, safetensor_files
from llmopt.loader.quantized import unpack_checkpoint
from llmopt.quant.gguf_vocab import add_vocab
from llmopt.weights.fp4 import quantize_fp4, to_blocks
from llmopt.weights.gguf_blocks import ENCODABLE, FP4_TYPES, encode, fits
from llmopt.weights.qweight import QuantizedWeight

PYTHON_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "MXFP4", "NVFP4")
# File types whose name in LlamaFileType is not MOSTLY_<type> (llama.cpp made MXFP4's
# for gpt-oss, whose experts alone it holds in MXFP4).
_FILE_TYPES = {"MXFP4": LlamaFileType.MOSTLY_MXFP4_MOE}
# llama.cpp file types that need no importance matrix (see LLAMA_FTYPE_MOSTLY_*).
LLAMA_CPP_QTYPES = (
    "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1", "Q5_K_S",
    "Q5_K_M", "Q6_K", "IQ3_S", "IQ3_M", "IQ4_NL", "IQ4_XS",
)  # fmt: skip

# Hugging Face `architectures` -> GGUF architecture. llama.cpp has no architecture of
# its own for Mistral 7B-style models: they are Llama with a sliding window.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}

# Hugging Face tensor name -> GGUF name, the reader's table turned around.
_GGUF_NAMES = {hf: name for name, hf in HF_NAMES.items()}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SKIPPED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some old checkpoints saved


Weight = torch.Tensor | QuantizedWeight


class _Source(NamedTuple):
    """One tensor of the model, by its Hugging Face name."""

    shape: tuple[int, ...]
    load: Callable[[], Weight]


class _Tensor(NamedTuple):
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: Q
    load: Callable[[], Weight]  # in llama.cpp's layout (q and k rows permuted)


def export_gguf(folder: Path, out: Path, qtype: str, threads: int | None = None) -> Path:
    """Write `folder` as a GGUF file at `out`, quantized to `qtype`; return `out`.

    `threads` is for llama.cpp's quantizer (default: all cores); the `gguf` route is numpy.
    """
    key = qtype.upper()
    if key not in PYTHON_QTYPES + LLAMA_CPP_QTYPES:
        raise UsageError(
            f"unknown GGUF type '{qtype}'; valid: {', '.join(PYTHON_QTYPES + LLAMA_CPP_QTYPES)}"
        )
    cfg = exportable_config(folder)
    if key in PYTHON_QTYPES:
        with atomic_file(out) as tmp:
            _write(folder, cfg, tmp, key)
        return out
    llama_cpp = _import_llama_cpp()
    with (
        atomic_file(out) as tmp,
        tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as scratch,
    ):
        lossless = Path(scratch) / "lossless.gguf"
        _write(folder, cfg, lossless, _source_dtype(folder))
        _llama_quantize(llama_cpp, lossless, tmp, key, threads)
    return out


def export_checkpoint(folder: Path, out: Path, qtype: str, name: str) -> Path:
    """Write an llmopt checkpoint whose linears are on `qtype`'s grid (Q4_0, Q4_1, MXFP4
    or NVFP4: gguf_blocks.ENCODABLE) as a GGUF file at `out`, their codes as they are;
    `name` is the model's name in the file."""
    key = qtype.upper()
    if key not in {t.name for t in ENCODABLE}:
        raise UsageError(
            f"a calibrated GGUF is written as {', '.join(t.name for t in ENCODABLE)}, not {qtype}"
        )
    cfg = exportable_config(folder)
    with atomic_file(out) as tmp:
        _write(folder, cfg, tmp, key, name)
    return out


def exportable_config(folder: Path) -> ModelConfig:
    """The folder's config, or a one-line error where GGUF export lacks its architecture."""
    cfg = read_config(folder)
    if cfg.architecture not in ARCHITECTURES:
        raise ModelFormatError(
            f"GGUF export does not support architecture '{cfg.architecture}'; supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return cfg


def has_llama_quantizer() -> bool:
    """Whether llama.cpp's quantizer (llama-cpp-python) is here, for the K-quants."""
    try:
        _import_llama_cpp()
    except UsageError:
        return False
    return True


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UsageError(
            "K-quants and other llama.cpp types need llama.cpp: pip install llama-cpp-python "
            f"(or use {', '.join(PYTHON_QTYPES)}, which need only gguf)"
        ) from None
    return llama_cpp


def _llama_quantize(llama_cpp: Any, src: Path, dst: Path, qtype: str, threads: int | None) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.nthread = threads or 0  # 0: llama.cpp uses every core
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)):
        raise ModelFormatError(f"llama.cpp could not quantize to {qtype}; its log says why")


def _source_dtype(folder: Path) -> str:
    """The GGUF float type that holds all of the folder's weights without loss."""
    from safetensors import safe_open

    dtypes = set()
    for path in safetensor_files(folder):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (not a dict)
    # safetensors and GGUF spell these two alike.
    return dtypes.pop() if dtypes in ({"F16"}, {"BF16"}) else "F32"


def _write(folder: Path, cfg: ModelConfig, path: Path, qtype: str, name: str | None = None) -> None:
    """The folder (dense, or an llmopt checkpoint) as a GGUF file of `qtype` at `path`."""
    arch = ARCHITECTURES[cfg.architecture]
    writer = GGUFWriter(path, arch)
    with ExitStack() as stack:
        stack.callback(writer.close)
        # A mixed checkpoint's int8 linears go to Q8_0 (rounded again: from one scale per
        # row to one per 32, the type's, far below the 4-bit error beside them).
        wide = {f"{p}.weight" for p in (cfg.quantization or {}).get("int8_linears", ())}
        tensors = _plan(_sources(folder, stack), cfg, arch, Q[qtype], wide)
        _add_metadata(writer, cfg, name or folder.resolve().name, qtype)
        add_vocab(writer, folder, cfg.vocab_size)
        extra = _rope_factors(writer, cfg)
        if extra is not None:
            tensors.append(_Tensor("rope_freqs.weight", tuple(extra.shape), Q.F32, lambda: extra))
        for t in tensors:
            byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
            writer.add_tensor_info(
                t.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), t.qtype
            )
            if t.qtype == Q.NVFP4:  # its tensor scale, F32 (1,), follows it
                writer.add_tensor_info(_scale_name(t.name), (4,), np.dtype(np.uint8), 4, Q.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data, scale = _blocks(t.load(), t.qtype)
            writer.write_tensor_data(data.view(np.uint8))
            if t.qtype == Q.NVFP4:
                writer.write_tensor_data(np.array([scale], np.float32).view(np.uint8))


def _scale_name(weight: str) -> str:
    """Where llama.cpp reads a weight's tensor scale: blk.0.attn_q.weight -> .scale."""
    return weight.removesuffix(".weight") + ".scale"


def _blocks(w: Weight, qtype: Q) -> tuple[np.ndarray, float]:
    """A tensor's bytes in qtype, and its tensor scale (NVFP4's; else 1): a quantized
    weight on qtype's grid as it is, anything else rounded to nearest (a quantized
    weight for another type dequantized first)."""
    if isinstance(w, QuantizedWeight):
        if fits(w, qtype):
            blocks, scale = encode(w, qtype)
            return blocks.numpy(), scale
        if qtype in ENCODABLE:  # rounding a calibrated weight again would undo it
            raise ModelFormatError(f"a quantized weight is not on {qtype.name}'s grid")
        w = w.dequantize()
    if qtype in FP4_TYPES:
        blocks, scale = to_blocks(quantize_fp4(w.float(), FP4_TYPES[qtype]))
        return blocks.numpy(), scale
    return quantize(w.float().numpy(), qtype), 1.0


def _sources(folder: Path, stack: ExitStack) -> dict[str, _Source]:
    """The folder's tensors by Hugging Face name, each read when written: a dense
    folder's from its safetensors, a quantized checkpoint's unpacked (loader/quantized)."""
    from safetensors import safe_open

    qcfg = read_config(folder).quantization
    if qcfg:
        return _checkpoint_sources(read_tensors(folder), qcfg)
    out: dict[str, _Source] = {}
    for path in safetensor_files(folder):
        f = stack.enter_context(safe_open(str(path), "pt"))
        for hf in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            out[hf] = _Source(
                tuple(f.get_slice(hf).get_shape()), lambda f=f, hf=hf: f.get_tensor(hf)
            )
    return out


def _checkpoint_sources(
    tensors: dict[str, torch.Tensor], qcfg: dict[str, Any]
) -> dict[str, _Source]:
    """A checkpoint's tensors, each quantized linear unpacked from its qweight and
    siblings when it is read (its shape read off one unpacking at planning)."""
    quantized = {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in quantized}
    out: dict[str, _Source] = {}
    for key, t in tensors.items():
        prefix = key.rpartition(".")[0]
        if prefix in quantized:
            parts[prefix][key] = t
        else:
            out[key] = _Source(tuple(t.shape), lambda t=t: t)
    for prefix, own in parts.items():

        def load(own: dict[str, torch.Tensor] = own, key: str = f"{prefix}.weight") -> Weight:
            return unpack_checkpoint(own, qcfg)[key]

        out[f"{prefix}.weight"] = _Source(load().shape, load)
    return out


def _plan(
    sources: dict[str, _Source], cfg: ModelConfig, arch: str, qtype: Q, wide: set[str]
) -> list[_Tensor]:
    heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}
    out: list[_Tensor] = []
    for hf, src in sources.items():
        if _SKIPPED.search(hf) or (cfg.tie_word_embeddings and hf == "lm_head.weight"):
            continue
        name = _gguf_name(hf)
        if name is None:
            raise ModelFormatError(f"unexpected tensor '{hf}' for {cfg.architecture}")
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        # llama.cpp's Llama kernels rotate interleaved pairs, HF rotates halves.
        permute = heads[kind] if arch == "llama" and kind in heads else None
        qt = _tensor_type(name, src.shape, Q.Q8_0 if hf in wide else qtype, cfg.tie_word_embeddings)
        out.append(_Tensor(name, src.shape, qt, _loader(src, permute)))
    return out


def _gguf_name(hf: str) -> str | None:
    m = _LAYER.match(hf)
    target = _GGUF_NAMES.get(_LAYER.sub("model.layers.{i}.", hf))
    return target.format(i=m.group(1)) if target and m else target


def _loader(src: _Source, heads: int | None) -> Callable[[], Weight]:
    def load() -> Weight:
        w = src.load()
        if not heads:
            return w
        if isinstance(w, QuantizedWeight):
            return w.map_rows(lambda t: _permute(t, heads))
        return _permute(w, heads)

    return load


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    # Per head, HF rows are [first halves of the rotary pairs | second halves]; llama.cpp
    # wants each pair's two rows side by side. The inverse of loader.gguf_weights.unpermute.
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _tensor_type(name: str, shape: tuple[int, ...], qtype: Q, tied: bool) -> Q:
    """Per-tensor type, following llama.cpp: norms and other 1-D tensors stay F32; the
    output projection keeps 8 bits in 4-bit files; rows that do not split into whole
    blocks fall back to F16."""
    if len(shape) == 1 or name.endswith("_norm.weight"):
        return Q.F32
    output = name == "output.weight" or (tied and name == "token_embd.weight")
    # NVFP4's tensor scale multiplies a matrix product: llama.cpp reads none for the
    # embedding's lookups (and refuses the file with one), so the embedding keeps 8 bits.
    output = output or (qtype == Q.NVFP4 and name == "token_embd.weight")
    want = Q.Q8_0 if output and qtype in (Q.Q4_0, Q.Q4_1, *FP4_TYPES) else qtype
    return want if shape[-1] % GGML_QUANT_SIZES[want][0] == 0 else Q.F16


def _add_metadata(writer: GGUFWriter, cfg: ModelConfig, name: str, qtype: str) -> None:
    writer.add_name(name)
    writer.add_file_type(
        LlamaFileType.ALL_F32
        if qtype == "F32"
        else _FILE_TYPES.get(qtype) or LlamaFileType[f"MOSTLY_{qtype}"]
    )
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.sliding_window:
        writer.add_sliding_window(cfg.sliding_window)


def _rope_factors(writer: GGUFWriter, cfg: ModelConfig) -> torch.Tensor | None:
    """Write the rope scaling keys; for Llama 3 scaling return the per-frequency divisors
    that llama.cpp reads from a rope_freqs tensor instead."""
    s = cfg.rope_scaling
    if not s:
        return None
    kind = s["rope_type"]
    if kind == "llama3":
        args = (cfg.head_dim, cfg.rope_theta)
        plain, _ = inv_frequencies(*args, None, cfg.max_position_embeddings)
        scaled, _ = inv_frequencies(*args, s, cfg.max_position_embeddings)
        return plain / scaled
    if kind not in ("linear", "yarn"):
        raise ModelFormatError(
            f"rope scaling '{kind}' has no GGUF form; supported: linear, yarn, llama3"
        )
    writer.add_rope_scaling_type(RopeScalingType(kind))
    writer.add_rope_scaling_factor(float(s["factor"]))
    if "original_max_position_embeddings" in s:
        writer.add_rope_scaling_orig_ctx_len(int(s["original_max_position_embeddings"]))
    return None
