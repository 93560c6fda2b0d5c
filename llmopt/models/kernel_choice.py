"""The one place that decides which kernels a model runs with over a given KV cache:
the attention backend, the native decode step and prefill attention's arithmetic
type. `LlamaForCausalLM.bind_cache` calls it, so an engine's runner and an offline
scorer (models/scoring.py) run a model the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.layers.linear import cpu_has_amx
from llmopt.layers.native_attention import NativeCpuAttention
from llmopt.models.native_decode import NativeDecoder

if TYPE_CHECKING:
    from llmopt.models.llama import LlamaForCausalLM


def choose_kernels(model: LlamaForCausalLM, cache: PagedKVCache) -> None:
    """Set each layer's attention backend and the model's native decode step for
    `cache`, from the device, the cache's type and the model's dtype."""
    native = None
    if cache.device.type == "cpu":
        # Attention reads the paged cache in place, whatever its element types, where the
        # C kernels build.
        native = NativeCpuAttention.load()
    model.native_decode = None
    if native is not None:
        # Decode-only steps: every block in one native call where the model's linears
        # all have a native kernel.
        model.native_decode = NativeDecoder.build(model, cache)
    prefill_dtype = None
    p = next(model.parameters())
    if p.device.type == "cpu" and p.dtype == torch.bfloat16 and cpu_has_amx():
        # A bf16 model's queries, keys and values are bf16 values already (the fp32
        # cache holds them exactly): prefill attends in bf16 on AMX at no cost in
        # precision. Models with fp32 activations keep fp32 attention: in bf16 the
        # Q4_1 SmolLM2 answers "What is the capital of France?" in French.
        prefill_dtype = torch.bfloat16
    for layer in model.layers:
        backend = native if native is not None else TorchAttention()
        backend.prefill_dtype = prefill_dtype
        layer.self_attn.backend = backend
