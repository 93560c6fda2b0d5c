"""Attention over a paged KV cache for a flat batch of sequences.

The runner lays a step out as one flat run of N new tokens: first the sequences that
decode (one query token each), then the chunks of sequences that prefill. Keys and
values live in a cache of fixed-size blocks, addressed by slot = block * block_size +
offset, in the cache's element types (a layer's view: `LayerKV`); `AttentionMetadata`
says where each new token's key goes and which slots each query reads. A backend
implements the two operations below; `TorchAttention` does it with plain torch ops on
CPU and CUDA, and a faster kernel can replace it.

Shapes: N new tokens, H query heads, KV key/value heads, G = H / KV, D head dim,
S cache slots, B decoding sequences, L their longest key count.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from llmopt.layers.attention_metadata import AttentionMetadata, DecodeBatch, PrefillChunk
from llmopt.layers.cascade import cascade_prefill, shared_prefix_groups
from llmopt.layers.kv_cache import LayerKV
from llmopt.layers.rotary import apply_rotary


class AttentionBackend(ABC):
    def rope_and_store(
        self,
        qkv: torch.Tensor,  # (N, (H + 2 KV) * D): the fused projection of the new tokens
        cos: torch.Tensor,  # (N, D)
        sin: torch.Tensor,  # (N, D)
        kv: LayerKV,
        meta: AttentionMetadata,
        num_heads: int,
    ) -> torch.Tensor:
        """Rotate the new queries and keys, store keys and values; returns the queries
        (N, H, D) for `attend`."""
        n, heads, d = qkv.shape[0], kv.num_kv_heads, kv.head_dim
        qk_size = (num_heads + heads) * d
        # q and k heads rotated together: (N, H + KV, D) in one pass.
        qk = apply_rotary(qkv[:, :qk_size].view(n, -1, d), cos, sin)
        q, k = qk.split([num_heads, heads], dim=1)
        kv.store(meta.slot_mapping, k, qkv[:, qk_size:].view(n, heads, d))
        return q

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,
        kv: LayerKV,
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

    def attend(self, q, kv, meta, scale, window) -> torch.Tensor:
        q = q.to(kv.dtype)
        if not meta.prefills:  # all decodes (the steady state): no assembly copy
            assert meta.decode is not None
            return self._decode(q, kv, meta.decode, scale)
        out = torch.empty_like(q)
        if meta.decode is not None:
            b = meta.num_decode
            out[:b] = self._decode(q[:b], kv, meta.decode, scale)
        chunks = meta.prefills
        dtype = self.prefill_dtype or q.dtype
        if q.device.type == "cpu" and all(c.sees_all(window) for c in chunks):
            groups, chunks = shared_prefix_groups(chunks)
            for group, shared in groups:
                cascade_prefill(q, kv, group, shared, scale, dtype, out)
        for c in chunks:
            rows = slice(c.q_start, c.q_start + c.q_len)
            out[rows] = self._prefill(q[rows], kv, c, scale, window, dtype)
        return out

    def _decode(self, q, kv: LayerKV, d: DecodeBatch, scale: float) -> torch.Tensor:
        b, h, dim = q.shape
        heads = kv.num_kv_heads
        if d.contiguous is not None:
            # A single sequence stored in consecutive slots: read views (of a cache in
            # the attention's type), copy nothing.
            run = slice(d.contiguous, d.contiguous + d.slots.shape[1])
            keys, values = kv.keys(run).unsqueeze(0), kv.values(run).unsqueeze(0)  # (1, L, KV, D)
        else:
            keys, values = kv.keys(d.slots), kv.values(d.slots)  # gathered: (B, L, KV, D)
        qh = q.view(b, heads, h // heads, dim) * scale  # (B, KV, G, D)
        scores = torch.matmul(qh, keys.permute(0, 2, 3, 1)).float()  # (B, KV, G, L)
        if d.valid is not None:
            scores = scores.masked_fill(~d.valid[:, None, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3))  # (B, KV, G, D)
        return out.reshape(b, h, dim)

    @staticmethod
    def _prefill(q, kv: LayerKV, c: PrefillChunk, scale, window, dtype) -> torch.Tensor:
        if c.contiguous is not None:
            run = slice(c.contiguous, c.contiguous + c.slots.shape[0])
            keys, values = kv.keys(run), kv.values(run)
        else:
            keys, values = kv.keys(c.slots), kv.values(c.slots)  # (S, KV, D)
        out_dtype = q.dtype
        q, keys, values = q.to(dtype), keys.to(dtype), values.to(dtype)
        if c.start == 0 and c.sees_all(window):
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
