"""Which architectures llmopt runs, by their Hugging Face and GGUF names."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmopt.config import ModelConfig
from llmopt.errors import ModelFormatError
from llmopt.models.gemma3 import build_gemma3
from llmopt.models.llama import build_llama

Builder = Callable[
    [ModelConfig, dict[str, torch.Tensor], torch.dtype, torch.device], torch.nn.Module
]

# Hugging Face `architectures` name -> builder. Mistral, Qwen2 and Qwen3 are Llama with
# a sliding window, q/k/v biases and q/k norms respectively, which the config carries.
# Gemma3ForConditionalGeneration runs its text decoder alone (no images).
ARCHITECTURES: dict[str, Builder] = {
    "LlamaForCausalLM": build_llama,
    "MistralForCausalLM": build_llama,
    "Qwen2ForCausalLM": build_llama,
    "Qwen3ForCausalLM": build_llama,
    "Gemma3ForCausalLM": build_gemma3,
    "Gemma3ForConditionalGeneration": build_gemma3,
}

# GGUF `general.architecture` -> Hugging Face name.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
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
