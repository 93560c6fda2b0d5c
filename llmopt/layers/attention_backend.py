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

import ctypes
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from llmopt.layers.rotary import apply_rotary

MAX_GROUP_DIM = 4096  # (query heads per KV head) x head_dim the native kernel holds (MAX_GD)


@dataclass
class PrefillChunk:
    """One sequence's run of query tokens in the flat batch (prompt prefill or recompute)."""

    q_start: int  # offset of its first query in the flat batch
    q_len: int
    start: int  # position of its first query (tokens already cached before it)
    lo: int  # position of its first visible key (> 0 only with a sliding window)
    slots: torch.Tensor  # (start + q_len - lo,) cache slots of keys lo .. start + q_len - 1
    contiguous: int | None = None  # first slot, when the slots are one consecutive run
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def additive_mask(self, window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(q_len, keys) 0 where query i (position start + i) sees key j (position
        lo + j), -inf elsewhere: in the attention's type, built once per step for all
        layers (per layer, building it cost 1.3 ms of a 512-token chunk's 20)."""
        if self._mask is None or self._mask.dtype != dtype:
            device = self.slots.device
            qpos = torch.arange(self.start, self.start + self.q_len, device=device)[:, None]
            kpos = torch.arange(self.lo, self.lo + self.slots.shape[0], device=device)[None]
            hidden = kpos > qpos
            if window is not None:
                hidden |= kpos <= qpos - window
            mask = torch.zeros(hidden.shape, dtype=dtype, device=device)
            self._mask = mask.masked_fill_(hidden, float("-inf"))
        return self._mask


@dataclass
class DecodeBatch:
    """The sequences with one query token each, at the head of the flat batch."""

    slots: torch.Tensor  # (B, L) cache slots of each sequence's visible keys, padded
    lens: torch.Tensor  # (B,) int64: how many of each row's slots are real
    valid: torch.Tensor | None  # (B, L) bool, False on padding; None when nothing is padded
    contiguous: int | None = None  # B == 1 and one consecutive run: its first slot


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) where each new token's key and value are written
    decode: DecodeBatch | None = None
    prefills: list[PrefillChunk] = field(default_factory=list)
    _prefill_layout: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_decode(self) -> int:
        return 0 if self.decode is None else self.decode.slots.shape[0]

    def prefill_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks for the native kernel, built once per step for all layers:
        their slots concatenated (int64), and (chunks, 4) int64 rows of q_start, q_len,
        start and the offset of the chunk's slots."""
        if self._prefill_layout is None:
            rows, at = [], 0
            for c in self.prefills:
                rows.append((c.q_start, c.q_len, c.start, at))
                at += c.slots.shape[0]
            slots = torch.cat([c.slots for c in self.prefills]).to(torch.int64).contiguous()
            self._prefill_layout = (slots, torch.tensor(rows, dtype=torch.int64))
        return self._prefill_layout


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
    # models on CPUs with AMX (the runner decides), where torch's flash kernel runs it on
    # tiles (SmolLM2, one layer of 512 queries over 1,024 keys: 4.1 ms against 9.5 in
    # fp32). Inputs rounded to bf16, softmax and sums in fp32 inside the kernel, the
    # output cast back. Decode stays in the cache's type: there attention reads far more
    # than it computes.
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
            groups, chunks = _shared_prefix_groups(chunks)
            for group, shared in groups:
                _cascade_prefill(q, k_cache, v_cache, group, shared, scale, dtype, out)
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
        # only 4-D inputs, and 3-D ones fall to the unfused math path (512 causal tokens
        # of SmolLM2, one layer: 6 ms against 25).
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


class NativeCpuAttention(TorchAttention):
    """TorchAttention with decode reading the paged cache in place (llmopt/kernels/
    paged_decode.c) instead of gathering each sequence's keys and values into a copy,
    rotary + cache store in one call (rope_store.c), and, on CPUs with AVX-512, every
    prefill chunk of a step in one call that also reads the cache in place
    (paged_prefill.c). For an fp32 cache on the CPU; build it with
    `NativeCpuAttention.load()`."""

    def __init__(self, decode, rope, prefill=None) -> None:  # the C functions, declared
        self.fn, self.rope, self.prefill = decode, rope, prefill

    @classmethod
    def load(cls) -> NativeCpuAttention | None:
        from llmopt.kernels.build import function

        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        # q, k, v, slots, lens; B, L, H, KV, D; scale; out
        decode = function("paged_decode", [ptr] * 5 + [i32] * 5 + [ctypes.c_float, ptr])
        # qkv, row, cos, sin, bf16, N, H, KV, D, k_cache, v_cache, slots, q_out
        rope = function("rope_store", [ptr, i64, ptr, ptr] + [i32] * 5 + [ptr] * 4)
        # q, k, v, slots, chunks; n_chunks, H, KV, D; scale; out -> 0, or -1 unsupported
        prefill = function("paged_prefill", [ptr] * 5 + [i32] * 4 + [ctypes.c_float, ptr], i32)
        if prefill is not None and prefill(None, None, None, None, None, 0, 1, 1, 64, 1.0, None):
            prefill = None  # built without AVX-512: torch's flash kernel instead
        return None if decode is None or rope is None else cls(decode, rope, prefill)

    def attend(self, q, k_cache, v_cache, meta, scale, window) -> torch.Tensor:
        if (
            not meta.prefills
            or self.prefill is None
            or window is not None
            or self.prefill_dtype is not None  # bf16 on AMX: torch's kernel on tiles
            or q.shape[2] % 64
        ):
            return super().attend(q, k_cache, v_cache, meta, scale, window)
        q = q.to(k_cache.dtype).contiguous()
        out = torch.empty_like(q)
        if meta.decode is not None:
            b = meta.num_decode
            out[:b] = self._decode(q[:b], k_cache, v_cache, meta.decode, scale)
        slots, chunks = meta.prefill_layout()
        self.prefill(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
            chunks.data_ptr(), len(meta.prefills), q.shape[1], k_cache.shape[1], q.shape[2],
            scale, out.data_ptr(),
        )  # fmt: skip
        return out

    def rope_and_store(self, qkv, cos, sin, k_cache, v_cache, meta, num_heads) -> torch.Tensor:
        if (
            qkv.dtype not in (torch.float32, torch.bfloat16)
            or qkv.stride(1) != 1
            or not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == qkv.dtype)
        ):
            return super().rope_and_store(qkv, cos, sin, k_cache, v_cache, meta, num_heads)
        n, kv, d = qkv.shape[0], k_cache.shape[1], k_cache.shape[2]
        q = torch.empty(n, num_heads, d)
        slots = meta.slot_mapping
        self.rope(
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
            int(qkv.dtype == torch.bfloat16), n, num_heads, kv, d, k_cache.data_ptr(),
            v_cache.data_ptr(), slots.data_ptr(), q.data_ptr(),
        )  # fmt: skip
        return q

    def _decode(self, q, k_cache, v_cache, d: DecodeBatch, scale: float) -> torch.Tensor:
        b, h, dim = q.shape
        # Also for one sequence in consecutive slots, where torch reads views and copies
        # nothing: its eight ops cost 130 us a layer there against 20-50 us for this
        # call (SmolLM2's 9 heads, 64-256 keys; equal at 1024).
        if h // k_cache.shape[1] * dim > MAX_GROUP_DIM:  # a head group too wide for it
            return super()._decode(q, k_cache, v_cache, d, scale)
        q = q.contiguous()
        out = torch.empty_like(q)
        self.fn(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), d.slots.data_ptr(),
            d.lens.data_ptr(), b, d.slots.shape[1], h, k_cache.shape[1], dim, scale,
            out.data_ptr(),
        )  # fmt: skip
        return out


class PagedKVCache:
    """Keys and values of every layer in fixed-size blocks.

    k, v: (layers, num_blocks * block_size, KV, D); slot s of layer i is k[i, s].
    Which blocks belong to which sequence is the block manager's business.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        # Uninitialised: a slot is only ever read after its key/value was written
        # (decode padding repeats a sequence's own first slot), and untouched pages of
        # a large CPU cache then cost no memory.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1] // self.block_size

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's contents into block dst, in every layer."""
        bs = self.block_size
        for src, dst in pairs:
            self.k[:, dst * bs : (dst + 1) * bs] = self.k[:, src * bs : (src + 1) * bs]
            self.v[:, dst * bs : (dst + 1) * bs] = self.v[:, src * bs : (src + 1) * bs]


# Prefill chunks of several sequences behind one cached prefix (16 requests with a
# 1,000-token system prompt, each with a question of its own): attended as one batched
# call over the prefix's keys, gathered once, plus each chunk's own keys, merged by
# log-sum-exp (cascade attention), instead of one call per chunk that gathers and reads
# the whole prefix again. SmolLM2, 15 chunks of 27 tokens over 1,008 shared keys, one
# layer: 15 calls 9.5 ms plus the gathers, against one call of 405 x 1,008 in 5.8 ms.
CASCADE_MIN_SHARED = 64  # keys; below this, per-chunk calls


def _shared_prefix_groups(
    chunks: list[PrefillChunk],
) -> tuple[list[tuple[list[PrefillChunk], int]], list[PrefillChunk]]:
    """([(chunks, shared key count)], the chunks left alone): chunks whose first keys
    lie in the same slots and before all their queries, grouped by their first slot."""
    by_first: dict[int, list[PrefillChunk]] = {}
    alone: list[PrefillChunk] = []
    for c in chunks:
        if c.lo == 0 and c.start >= CASCADE_MIN_SHARED:
            by_first.setdefault(int(c.slots[0]), []).append(c)
        else:
            alone.append(c)
    groups = []
    for members in by_first.values():
        lead = members[0].slots
        shared = min(c.start for c in members)
        for c in members[1:]:
            same = (c.slots[:shared] == lead[:shared]).logical_not().nonzero()
            shared = int(same[0]) if len(same) else shared
        if len(members) > 1 and shared >= CASCADE_MIN_SHARED:
            groups.append((members, shared))
        else:
            alone.extend(members)
    return groups, alone


def _heads(x: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(S, KV, D) cache rows -> (1, H, S, D) in dtype, KV heads repeated for their
    query heads."""
    return x.to(dtype).transpose(0, 1).repeat_interleave(heads // x.shape[1], dim=0)[None]


def _cascade_prefill(q, k_cache, v_cache, chunks, shared: int, scale, dtype, out) -> None:
    """out[rows of chunks] = attention of their queries over the shared prefix (keys
    0 .. shared-1, the same slots for all) and their own keys, causal; computed in dtype,
    merged in q's."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    h = q.shape[1]
    rows = [slice(c.q_start, c.q_start + c.q_len) for c in chunks]
    qs = torch.cat([q[r] for r in rows]).to(dtype).transpose(0, 1)[None]  # (1, H, N, D)
    prefix = chunks[0].slots[:shared]
    o_pre, lse_pre = flash(
        qs, _heads(k_cache[prefix], h, dtype), _heads(v_cache[prefix], h, dtype), scale=scale
    )  # (1, H, N, D), (1, H, N) fp32
    o_pre = o_pre.to(q.dtype)
    at = 0
    for c, r in zip(chunks, rows, strict=True):
        own = c.slots[shared:]  # keys at positions shared .. start + q_len - 1
        qpos = torch.arange(c.start, c.start + c.q_len)[:, None]
        kpos = torch.arange(shared, shared + own.shape[0])[None, :]
        mask = torch.zeros(qpos.shape[0], kpos.shape[1], dtype=dtype)
        mask.masked_fill_(kpos > qpos, float("-inf"))
        o_own, lse_own = flash(
            qs[:, :, at : at + c.q_len],
            _heads(k_cache[own], h, dtype),
            _heads(v_cache[own], h, dtype),
            attn_mask=mask,
            scale=scale,
        )
        lp, lo = lse_pre[:, :, at : at + c.q_len], lse_own
        m = torch.maximum(lp, lo)
        wp, wo = (lp - m).exp()[..., None], (lo - m).exp()[..., None]
        merged = (o_pre[:, :, at : at + c.q_len] * wp + o_own.to(q.dtype) * wo) / (wp + wo)
        out[r] = merged[0].transpose(0, 1)  # (q_len, H, D)
        at += c.q_len
