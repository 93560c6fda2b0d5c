"""From a path (GGUF file or Hugging Face folder) to a ready model and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError, ModelNotFoundError
from llmopt.loader.hf import read_config, read_tensors
from llmopt.loader.quantized import unpack_checkpoint
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
    path: Path, dtype: torch.dtype, device: torch.device, store: Store, console: Console
) -> LoadedModel:
    folder = hf_folder_for(path, store, console)
    cfg = read_config(folder)
    build = builder_for(cfg.architecture)
    tokenizer = Tokenizer(folder)
    tensors = read_tensors(folder)
    weights = unpack_checkpoint(tensors, cfg.quantization) if cfg.quantization else tensors
    model = build(cfg, weights, dtype, device)
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_id is not None:
        eos.add(tokenizer.eos_id)
    return LoadedModel(model, tokenizer, cfg, folder, eos)
