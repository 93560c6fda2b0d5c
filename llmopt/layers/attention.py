"""Grouped-query self-attention: projections and rotary embeddings; the attention
itself over the paged KV cache is the backend's (see attention_backend).

Shapes: N new tokens in the flat batch, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.layers.attention_backend import AttentionBackend, TorchAttention
from llmopt.layers.attention_metadata import AttentionMetadata
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.linear import Linear


class Attention(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        sliding_window: int | None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        # q, k and v in one matmul: one weight read per step instead of three launches.
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden, bias=False)
        self.scale = head_dim**-0.5
        self.window = sliding_window
        self.backend: AttentionBackend = TorchAttention()

    def forward(
        self,
        x: torch.Tensor,  # (N, hidden), the flat batch of new tokens
        cos: torch.Tensor,  # (N, D) in x's dtype
        sin: torch.Tensor,  # (N, D)
        kv: LayerKV,  # this layer's slots of the paged cache
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)  # (N, (H + 2 KV) * D)
        q = self.backend.rope_and_store(qkv, cos, sin, kv, meta, self.num_heads)
        out = self.backend.attend(q, kv, meta, self.scale, self.window)
        return self.o_proj(out.reshape(n, self.q_size).to(x.dtype))
