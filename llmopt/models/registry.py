"""Which architectures llmopt runs, by their Hugging Face and GGUF names."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError
from llmopt.models.llama import build_model

Builder = Callable[
    [ModelConfig, dict[str, torch.Tensor], torch.dtype, torch.device], torch.nn.Module
]

# Hugging Face `architectures` name -> builder. Mistral and Qwen2 are Llama with a
# sliding window and q/k/v biases respectively, which the config carries.
ARCHITECTURES: dict[str, Builder] = {
    "LlamaForCausalLM": build_model,
    "MistralForCausalLM": build_model,
    "Qwen2ForCausalLM": build_model,
}

# GGUF `general.architecture` -> Hugging Face name.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def builder_for(architecture: str) -> Builder:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ModelFormatError(
            f"architecture '{architecture}' is not supported; supported: "
            f"{', '.join(sorted(ARCHITECTURES))}"
        ) from None


def hf_architecture_for_gguf(name: str) -> str:
    try:
        return GGUF_ARCHITECTURES[name]
    except KeyError:
        raise ModelFormatError(
            f"GGUF architecture '{name}' is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}"
        ) from None
