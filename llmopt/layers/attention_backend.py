"""Attention over a paged KV cache for a flat batch of sequences.

The runner lays a step out as one flat run of N new tokens: first the sequences that
decode (one query token each), then the chunks of sequences that prefill. Keys and
values live in a cache of fixed-size blocks, addressed by slot = block * block_size +
offset; `AttentionMetadata` says where each new token's key goes and which slots each
query reads. A backend implements the two operations below; `TorchAttention` does it
with plain torch ops on CPU and CUDA, and a faster kernel can replace it.

Shapes: N new tokens, H query heads, KV key/value heads, G = H / KV, D head dim,
S cache slots, B decoding sequences, L their longest key count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from llmopt.layers.attention_metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from llmopt.layers.cascade import cascade_prefill, shared_prefix_groups
from llmopt.layers.rotary import apply_rotary


class AttentionBackend(ABC):
    def rope_and_store(
        self,
        qkv: torch.Tensor,  # (N, (H + 2 KV) * D): the fused projection of the new tokens
        cos: torch.Tensor,  # (N, D)
        sin: torch.Tensor,  # (N, D)
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        num_heads: int,
    ) -> torch.Tensor:
        """Rotate the new queries and keys, store keys and values (`write`); returns the
        queries (N, H, D) for `attend`."""
        n, kv, d = qkv.shape[0], k_cache.shape[1], k_cache.shape[2]
        qk_size = (num_heads + kv) * d
        # q and k heads rotated together: (N, H + KV, D) in one pass.
        qk = apply_rotary(qkv[:, :qk_size].view(n, -1, d), cos, sin)
        q, k = qk.split([num_heads, kv], dim=1)
        self.write(k_cache, v_cache, k, qkv[:, qk_size:].view(n, kv, d), meta)
        return q

    @abstractmethod
    def write(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        """Store the new tokens' keys and values, k/v: (N, KV, D), into their slots of
        k_cache/v_cache: (S, KV, D)."""

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """Causal attention of the new queries q: (N, H, D) over each one's own
        sequence in the cache (keys already written). Returns (N, H, D)."""


class TorchAttention(AttentionBackend):
    # Prefill attention's arithmetic type, when it is not the cache's: bf16 for bf16
    # models on CPUs with AMX (models/kernel_choice.py decides), where torch's flash
    # kernel runs it on tiles, faster than in fp32. Inputs rounded to bf16, softmax and
    # sums in fp32 inside the kernel, the output cast back. Decode stays in the cache's
    # type: there attention reads far more than it computes.
    prefill_dtype: torch.dtype | None = None

    def write(self, k_cache, v_cache, k, v, meta) -> None:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

    def attend(self, q, k_cache, v_cache, meta, scale, window) -> torch.Tensor:
        q = q.to(k_cache.dtype)
        if not meta.prefills:  # all decodes (the steady state): no assembly copy
            assert meta.decode is not None
            return self._decode(q, k_cache, v_cache, meta.decode, scale)
        out = torch.empty_like(q)
        if meta.decode is not None:
            b = meta.num_decode
            out[:b] = self._decode(q[:b], k_cache, v_cache, meta.decode, scale)
        chunks = meta.prefills
        dtype = self.prefill_dtype or q.dtype
        if window is None and q.device.type == "cpu":
            groups, chunks = shared_prefix_groups(chunks)
            for group, shared in groups:
                cascade_prefill(q, k_cache, v_cache, group, shared, scale, dtype, out)
        for c in chunks:
            rows = slice(c.q_start, c.q_start + c.q_len)
            out[rows] = self._prefill(q[rows], k_cache, v_cache, c, scale, window, dtype)
        return out

    def _decode(self, q, k_cache, v_cache, d: DecodeBatch, scale: float) -> torch.Tensor:
        b, h, dim = q.shape
        kv = k_cache.shape[1]
        if d.contiguous is not None:
            # A single sequence stored in consecutive slots: read views, copy nothing.
            n = d.slots.shape[1]
            keys = k_cache[d.contiguous : d.contiguous + n].unsqueeze(0)  # (1, L, KV, D)
            values = v_cache[d.contiguous : d.contiguous + n].unsqueeze(0)
        else:
            keys, values = k_cache[d.slots], v_cache[d.slots]  # gathered: (B, L, KV, D)
        qh = q.view(b, kv, h // kv, dim) * scale  # (B, KV, G, D)
        scores = torch.matmul(qh, keys.permute(0, 2, 3, 1)).float()  # (B, KV, G, L)
        if d.valid is not None:
            scores = scores.masked_fill(~d.valid[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # (B, KV, G, D)
        return out.reshape(b, h, dim)

    @staticmethod
    def _prefill(q, k_cache, v_cache, c: PrefillChunk, scale, window, dtype) -> torch.Tensor:
        if c.contiguous is not None:
            n = c.slots.shape[0]
            keys, values = (
                k_cache[c.contiguous : c.contiguous + n],
                v_cache[c.contiguous : c.contiguous + n],
            )
        else:
            keys, values = k_cache[c.slots], v_cache[c.slots]  # (S, KV, D)
        out_dtype = q.dtype
        q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
        if c.start == 0 and c.lo == 0 and (window is None or keys.shape[0] <= window):
            mask, causal = None, True
        else:
            mask, causal = c.additive_mask(window, dtype), False
        # With a batch dimension, (1, H, T, D): torch's CPU flash-attention kernel takes
        # only 4-D inputs, and 3-D ones fall to the unfused math path, several times slower.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )[0]  # (H, T, D)
        return out.transpose(0, 1).to(out_dtype)
