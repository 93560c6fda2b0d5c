"""Hugging Face model folders: config.json, *.safetensors (single or sharded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON: {e}") from e
    gen = folder / "generation_config.json"
    if gen.is_file():
        # generation_config.json often names more end-of-turn tokens than config.json.
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            raw = {**raw, "eos_token_id": eos}
    return ModelConfig.from_hf(raw)


def safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(
            f"{folder} has no .safetensors weights (pytorch_model.bin is not read: convert it "
            "with transformers' save_pretrained(safe_serialization=True))"
        )
    return files


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder, memory-mapped (no copy until converted)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in safetensor_files(folder):
        if not f.is_file():
            raise ModelFormatError(f"shard {f.name} listed in the index is missing from {folder}")
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{f} is damaged or incomplete ({e})") from e
    return out


def parameter_count(folder: Path) -> int:
    """Elements of every tensor the folder stores, read from the safetensors headers
    (a tied embedding is stored, and counted, once)."""
    from safetensors import SafetensorError, safe_open

    n = 0
    for f in safetensor_files(folder):
        try:
            with safe_open(str(f), "pt") as st:
                names = st.keys()  # a list: safe_open is not a mapping
                n += sum(math.prod(st.get_slice(name).get_shape()) for name in names)
        except (SafetensorError, OSError) as e:
            raise ModelFormatError(f"{f} is damaged or incomplete ({e})") from e
    return n
