"""From a path (GGUF file or Hugging Face folder) to a ready model and tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError, ModelNotFoundError
from llmopt.loader.hf import read_config, read_tensors
from llmopt.loader.quantized import Weights, unpack_checkpoint
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


def hf_folder_for(path: Path, store: Store, console: Console) -> Path:
    """The Hugging Face folder to load: the folder itself, or a GGUF's converted copy."""
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
    folder = store.converted_dir(path)
    if not (folder / "model.safetensors").is_file():
        # Dequantizing takes seconds; the fp32 copy makes every later load instant.
        from llmopt.loader.gguf import GGUFFile  # the gguf package is only needed here

        with console.status(f"Converting {path.name} (once; cached in {folder.parent})"):
            GGUFFile(path).convert(folder)
    return folder


def load_model(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    store: Store,
    console: Console,
    dequantize: bool = False,
) -> LoadedModel:
    """dtype: the activations' and dense weights' type. A GGUF file's Q4_0/Q4_1/Q8_0
    linears run as they are stored, with the int kernels (the weights llama.cpp
    computes with, at a quarter to an eighth of fp32's bytes), where the device has
    them; `dequantize` (or a device without them) multiplies dense copies in `dtype`."""
    folder = hf_folder_for(path, store, console)  # config and tokenizer for a GGUF too
    cfg = read_config(folder)
    build = builder_for(cfg.architecture)
    tokenizer = Tokenizer(folder)
    if _keeps_gguf_blocks(path, device, dequantize):
        weights = gguf_blocks(path, folder, cfg)
        if "lm_head.weight" in weights:  # the tied head kept in the embedding's blocks
            cfg = replace(cfg, tie_word_embeddings=False)
    else:
        tensors = read_tensors(folder)
        weights = unpack_checkpoint(tensors, cfg.quantization) if cfg.quantization else tensors
    model = build(cfg, weights, dtype, device)
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_id is not None:
        eos.add(tokenizer.eos_id)
    return LoadedModel(model, tokenizer, cfg, folder, eos)


def gguf_blocks(path: Path, folder: Path, cfg: ModelConfig) -> Weights:
    """A GGUF file's weights with its int-kernel types kept quantized, read through the
    conversion cache's tensor index."""
    from llmopt.loader.gguf_weights import hf_weights, read_index

    arch, records = read_index(path, _tensor_index(path, folder))
    return hf_weights(records, cfg, arch, path.name, keep_quantized=True)


def _tensor_index(path: Path, folder: Path) -> Path:
    """The conversion cache's index of the file's tensors, written here for caches that
    predate it."""
    from llmopt.loader.gguf_weights import INDEX, write_index

    if not (folder / INDEX).is_file():
        from llmopt.loader.gguf import GGUFFile

        g = GGUFFile(path)
        write_index(g.reader, g.arch, folder / INDEX)
    return folder / INDEX


def runs_quantized(
    path: Path, device: torch.device, store: Store, console: Console, dequantize: bool = False
) -> bool:
    """Whether the model at path will run linears quantized on this device's int kernels
    (a GGUF's Q4_0/Q4_1/Q8_0 blocks as stored, or a quantized checkpoint on the CPU),
    known before loading it: the activations' dtype is chosen from it
    (device.resolve_dtype). A GGUF file is converted into the store here if it was not."""
    if device.type != "cpu":
        return False
    if path.suffix == ".gguf":
        if not _keeps_gguf_blocks(path, device, dequantize):
            return False
        from llmopt.loader.gguf_weights import has_kept_blocks

        return has_kept_blocks(_tensor_index(path, hf_folder_for(path, store, console)))
    try:  # only the one key: a malformed folder is load_model's to report
        return json.loads((path / "config.json").read_text()).get("quantization_config") is not None
    except (OSError, ValueError, AttributeError):
        return False


def _keeps_gguf_blocks(path: Path, device: torch.device, dequantize: bool) -> bool:
    """Whether a GGUF's blocks are loaded as they are: the int kernels are the CPU's (on
    CUDA a quantized linear dequantizes every call, slower than the dense weight)."""
    if path.suffix != ".gguf" or dequantize or device.type != "cpu":
        return False
    from llmopt.kernels import qgemv

    return qgemv.load() is not None
