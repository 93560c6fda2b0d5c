"""Grouped-query self-attention over a per-sequence KV cache.

Shapes: T new tokens, S cached + new tokens, H query heads, KV key/value heads,
G = H / KV queries per KV head, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.layers.linear import Linear
from llmopt.layers.rotary import apply_rotary


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

    def forward(
        self,
        x: torch.Tensor,  # (T, hidden)
        cos: torch.Tensor,  # (T, D) in x's dtype
        sin: torch.Tensor,  # (T, D)
        k_cache: torch.Tensor,  # (S_max, KV, D), this layer's slice of the cache
        v_cache: torch.Tensor,  # (S_max, KV, D)
        start: int,  # tokens of this sequence already in the cache
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        # Rotate q and k heads together: (T, H + KV, D) in one pass.
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        end = start + t
        # The cache may be wider than the model dtype (fp32 on CPUs without bf16
        # arithmetic, where small bf16 matmuls are several times slower).
        k_cache[start:end] = k
        v_cache[start:end] = v
        # The first new query (at `start`) sees back to start - window + 1.
        lo = 0 if self.window is None else max(0, start + 1 - self.window)
        keys, values = k_cache[lo:end], v_cache[lo:end]  # views, no copy: (S, KV, D)
        q = q.to(k_cache.dtype)
        out = self._decode(q, keys, values) if t == 1 else self._prefill(q, keys, values, start, lo)
        return self.o_proj(out.reshape(t, self.q_size).to(x.dtype))

    def _decode(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        # One query token: two small batched matmuls per KV head, no mask needed.
        g = self.num_heads // self.num_kv_heads
        qh = q.view(self.num_kv_heads, g, self.head_dim) * self.scale  # (KV, G, D)
        scores = torch.matmul(qh, keys.permute(1, 2, 0)).float()  # (KV, G, S)
        probs = scores.softmax(dim=-1).to(values.dtype)
        return torch.matmul(probs, values.transpose(0, 1))  # (KV, G, D)

    def _prefill(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, lo: int
    ) -> torch.Tensor:
        t, s = q.shape[0], keys.shape[0]
        qh, kh, vh = q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1)
        if start == 0 and (self.window is None or s <= self.window):
            mask, causal = None, True
        else:
            # Query i sits at absolute position start + i; key j at lo + j.
            qpos = torch.arange(start, start + t, device=q.device)[:, None]
            kpos = torch.arange(lo, lo + s, device=q.device)[None, :]
            mask = kpos <= qpos
            if self.window is not None:
                mask &= kpos > qpos - self.window
            causal = False
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=True
        )  # (H, T, D)
        return out.transpose(0, 1)
