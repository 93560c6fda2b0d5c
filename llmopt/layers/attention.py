"""Grouped-query self-attention: projections, optional per-head q/k norms (Qwen3,
Gemma 3) and rotary embeddings; the attention itself over the paged KV cache is the
backend's (see attention_backend).

Shapes: N new tokens in the flat batch, H query heads, KV key/value heads, D head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.layers.attention_backend import AttentionBackend, TorchAttention
from llmopt.layers.attention_metadata import AttentionMetadata
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.linear import Linear
from llmopt.layers.norm import RMSNorm


class Attention(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        sliding_window: int | None,
        qk_norm_eps: float | None = None,  # per-head RMSNorm of q and k with this eps
        scale: float | None = None,  # of the scores; None: head_dim ** -0.5
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        # q, k and v in one matmul: one weight read per step instead of three launches.
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden, bias=False)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps)
        self.scale = head_dim**-0.5 if scale is None else scale
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
        if self.q_norm is not None:
            self._norm_heads(qkv)
        q = self.backend.rope_and_store(qkv, cos, sin, kv, meta, self.num_heads)
        meta = meta.for_window(self.window)
        out = self.backend.attend(q, kv, meta, self.scale, self.window)
        return self.o_proj(out.reshape(n, self.q_size).to(x.dtype))

    def _norm_heads(self, qkv: torch.Tensor) -> None:
        """RMSNorm of each query and key head over its D values, in place in qkv (the
        projection's own output): rows of (N * H, D) and (N * KV, D)."""
        n, d = qkv.shape[0], self.head_dim
        q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
        assert self.q_norm is not None and self.k_norm is not None
        q.copy_(self.q_norm(q.reshape(n * self.num_heads, d)).view(n, -1))
        k.copy_(self.k_norm(k.reshape(n * self.num_kv_heads, d)).view(n, -1))
