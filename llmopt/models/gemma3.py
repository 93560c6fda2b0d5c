"""The Gemma 3 decoder (text): Llama's pre-norm blocks with a norm after attention and
after the MLP as well (four per block), per-head q/k norms, a GELU-gated MLP, and
sliding-window (local) layers interleaved with global ones (five to one in the released
models; the config lists them), each kind with its own rotary base. Embeddings are
scaled by sqrt(hidden) on the way in; the logits may be soft-capped on the way out.

Gemma's checkpoints store each RMSNorm weight as an offset from one (the norm
multiplies by 1 + w); the state dict mapping adds the one, so that the norms here are
Llama's own (and its fused residual-add kernel). In a bf16 model 1 + w is then rounded
to bf16, where the reference adds it in fp32.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from llmopt.config import ModelConfig
from llmopt.layers.attention_metadata import AttentionMetadata
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.mlp import GeGLU
from llmopt.layers.norm import RMSNorm
from llmopt.layers.rotary import RotaryEmbedding
from llmopt.models.llama import (
    LlamaForCausalLM,
    Weight,
    attention_for,
    build_model,
    fuse_hf_layer,
)
from llmopt.models.llama import fuse_hf_parts as llama_parts

# The norms of a block beyond Llama's two (input_layernorm and post_attention_layernorm,
# which Gemma applies to attention's output rather than the MLP's input).
_EXTRA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
# Gemma's checkpoints store each norm weight as an offset from this (the norm multiplies
# by NORM_OFFSET + w): the mapping adds it, and AWQ's folds divide the whole.
NORM_OFFSET = 1.0
# Gemma3ForConditionalGeneration's text decoder under its checkpoint names (transformers
# 5, and earlier) -> Gemma3ForCausalLM's.
_MULTIMODAL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = attention_for(cfg, i)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps)
        self.mlp = GeGLU(hidden, cfg.intermediate_size)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps)

    def native_norms(self) -> tuple[RMSNorm | None, ...]:
        return (
            self.input_layernorm,
            self.pre_feedforward_layernorm,
            self.post_attention_layernorm,
            self.post_feedforward_layernorm,
        )

    def forward(
        self,
        x: torch.Tensor,  # (N, hidden): the previous block's (normed) MLP output
        residual: torch.Tensor | None,  # (N, hidden): the stream before it; None in block 0
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: LayerKV,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As Llama's block: returns (this block's output, the residual stream before it),
        each residual add fused into the norm that follows it."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        a = self.post_attention_layernorm(self.self_attn(h, cos, sin, kv, meta))
        h = self.pre_feedforward_layernorm(a, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma3DecoderLayer

    @staticmethod
    def hf_layer(cfg: ModelConfig, hf: Mapping[str, Weight], i: int) -> dict[str, Weight]:
        part = fuse_hf_layer(cfg, hf, i)
        _add_extra_norms(part, hf, i)
        return _norms_from_offsets(part)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        # The global layers rotate with `rope_theta` (and its scaling), the local ones
        # with their own base, unscaled.
        self.local_rotary = RotaryEmbedding(
            cfg.head_dim, cfg.local_rope_theta or 10000.0, None, cfg.max_position_embeddings
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # sqrt(hidden) rounded to the weights' type first, as the reference multiplies.
        scale = torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype).item()
        return x.mul_(scale)

    def rope_tables(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        full, local = self.rotary(positions, dtype), self.local_rotary(positions, dtype)
        return [full if layer.self_attn.window is None else local for layer in self.layers]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().logits(hidden)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap


def gemma3_parts(cfg: ModelConfig, hf: Mapping[str, Weight]) -> Iterator[dict[str, Weight]]:
    """Map a Hugging Face Gemma 3 state dict (text-only or multimodal) onto this
    module's names, part by part: Llama's mapping plus the extra norms, each norm
    weight w made 1 + w."""
    text = hf  # a GGUF file's (read lazily) are the text model's names
    if any(_text_name(n) != n for n in hf):  # a multimodal checkpoint's folder
        text = {_text_name(n): w for n, w in hf.items()}
    for n, part in enumerate(llama_parts(cfg, text)):
        if n > 0:  # decoder layer n - 1
            _add_extra_norms(part, text, n - 1)
        yield _norms_from_offsets(part)


def _add_extra_norms(part: dict[str, Weight], hf: Mapping[str, Weight], i: int) -> None:
    for norm in _EXTRA_NORMS:
        part[f"layers.{i}.{norm}.weight"] = hf[f"model.layers.{i}.{norm}.weight"]


def _norms_from_offsets(part: dict[str, Weight]) -> dict[str, Weight]:
    """Each norm weight w of a part made 1 + w (in place; the part returned)."""
    for name, w in part.items():
        if name.endswith("norm.weight"):
            assert isinstance(w, torch.Tensor)  # norms are never quantized
            part[name] = w.float() + NORM_OFFSET
    return part


def _text_name(name: str) -> str:
    for old, new in _MULTIMODAL_PREFIXES:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def build_gemma3(
    cfg: ModelConfig, hf: Mapping[str, Weight], dtype: torch.dtype, device: torch.device
) -> LlamaForCausalLM:
    return build_model(Gemma3ForCausalLM, gemma3_parts, cfg, hf, dtype, device)
