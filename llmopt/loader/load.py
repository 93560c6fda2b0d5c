"""From a path (GGUF file or Hugging Face folder) to a ready model and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmopt import heap
from llmopt.config import ModelConfig
from llmopt.distributed.shard import Shard
from llmopt.distributed.stage import Stage
from llmopt.errors import ModelFormatError, ModelNotFoundError
from llmopt.loader.hf import read_config, read_tensors
from llmopt.loader.quantized import tie_quantized_head, unpack_checkpoint
from llmopt.models.registry import builder_for
from llmopt.store.store import Store
from llmopt.tokenizer import Tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    folder: Path  # the Hugging Face folder the weights came from
    eos_ids: set[int]


def hf_folder_for(path: Path, store: Store, console: Console, dense: bool = False) -> Path:
    """The Hugging Face folder to load: the folder itself, or a GGUF's converted copy
    (config, tokenizer and the index of its tensors; with `dense`, fp32 safetensors of
    them too, for the code that reads weights from a folder: quantize, export)."""
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelFormatError(
                f"{path} is a folder without config.json: give a Hugging Face model folder "
                "or a .gguf file"
            )
        return path
    if path.suffix != ".gguf":
        raise ModelFormatError(f"{path}: expected a .gguf file or a Hugging Face folder")
    from llmopt.loader.converted_format import FORMAT, format_of
    from llmopt.loader.gguf_weights import INDEX

    folder = store.converted_dir(path)
    # Parsing the metadata (the tokenizer's vocabulary) takes seconds: once.
    if not (folder / "config.json").is_file() or not (folder / INDEX).is_file():
        from llmopt.loader.gguf import GGUFFile  # the gguf package is only needed here

        with console.status(f"Reading {path.name} (once; cached in {folder.parent})"):
            GGUFFile(path).convert(folder)
    elif format_of(folder) < FORMAT:
        # Converted by an older llmopt: add the files it lacks, keeping its dense weights.
        from llmopt.loader.gguf import GGUFFile

        with console.status(f"Reading {path.name} again (once, for its tokenizer)"):
            GGUFFile(path).upgrade(folder)
    if dense and not (folder / "model.safetensors").is_file():
        from llmopt.loader.gguf import GGUFFile

        with console.status(f"Dequantizing {path.name} to fp32 (once)"):
            GGUFFile(path).write_dense(folder)
    return folder


@dataclass(frozen=True)
class ModelSource:
    """A model found and read up to its weights: what it is and how it will run,
    known before any weight is loaded (the activations' dtype is chosen from it)."""

    path: Path  # the GGUF file or Hugging Face folder given
    folder: Path  # the Hugging Face folder: config and tokenizer (a GGUF's converted copy)
    config: ModelConfig
    # A GGUF file's tensor index (gguf_weights.write_index), through which its weights
    # are read; None for a folder.
    gguf_index: dict[str, Any] | None
    keeps_blocks: bool  # the GGUF's block linears stay packed, on the int kernels
    runs_quantized: bool  # linears on the int kernels (device.resolve_dtype reads it)


def open_source(
    path: Path, device: torch.device, store: Store, console: Console, dequantize: bool = False
) -> ModelSource:
    """Find the model's config and tokenizer (reading a GGUF file's metadata into the
    store once) and decide how its linears run on `device`. A GGUF file's block
    linears (Q4_0 .. Q8_0, the K-quants) run as they are stored, with the int kernels
    (a quarter to an eighth of fp32's bytes), where the device has them; `dequantize`
    (or a device without them) multiplies dense copies. A quantized checkpoint runs its
    int kernels on the CPU."""
    folder = hf_folder_for(path, store, console)
    cfg = read_config(folder)
    builder_for(cfg.architecture)  # an unsupported architecture is refused before loading
    index, keep = None, False
    if path.suffix == ".gguf":
        from llmopt.loader.gguf_weights import INDEX, has_kept_blocks, load_index

        index = load_index(folder / INDEX)
        keep = _keeps_gguf_blocks(device, dequantize) and has_kept_blocks(index)
    quantized = keep or (device.type == "cpu" and cfg.quantization is not None)
    return ModelSource(path, folder, cfg, index, keep, quantized)


def load_model(
    path: Path | ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    store: Store | None = None,
    console: Console | None = None,
    dequantize: bool = False,
    part: Shard | Stage | None = None,
) -> LoadedModel:
    """The model at `path` (or an opened source) built on `device`; dtype: the
    activations' and dense weights' type. With `part`, only a tensor-parallel rank's
    shard of it or a pipeline stage's layers (distributed/; the model's config is the
    part's, the LoadedModel's the whole model's)."""
    source = (
        path
        if isinstance(path, ModelSource)
        else open_source(
            path, device, store or Store(), console or Console(stderr=True), dequantize
        )
    )
    cfg = source.config
    # The tokenizer first: its parse's transient memory is freed (heap.trim) before the
    # weights arrive, so that the two peaks do not add up.
    tokenizer = Tokenizer(source.folder)
    if source.gguf_index is not None:
        from llmopt.loader.gguf_weights import hf_weights, read_index

        arch, records = read_index(source.path, source.gguf_index)
        weights = hf_weights(records, cfg, arch, source.path.name, source.keeps_blocks)
        if "lm_head.weight" in weights:  # the tied head kept in the embedding's blocks
            cfg = replace(cfg, tie_word_embeddings=False)
    else:
        tensors = read_tensors(source.folder)
        weights = unpack_checkpoint(tensors, cfg.quantization) if cfg.quantization else tensors
        cfg = tie_quantized_head(weights, cfg)
    built = cfg
    if part is not None:
        part.check(cfg)
        weights, built = part.weights(weights, cfg), part.config(cfg)
    model = builder_for(cfg.architecture)(built, weights, dtype, device)
    heap.trim()  # the decoded parts' buffers, freed layer by layer
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_id is not None:
        eos.add(tokenizer.eos_id)
    return LoadedModel(model, tokenizer, cfg, source.folder, eos)


def _keeps_gguf_blocks(device: torch.device, dequantize: bool) -> bool:
    """Whether a GGUF's blocks are loaded as they are: the int kernels are the CPU's (on
    CUDA a quantized linear dequantizes every call, slower than the dense weight)."""
    if dequantize or device.type != "cpu":
        return False
    from llmopt.kernels import qgemv

    return qgemv.load() is not None
