"""Attention over the paged KV cache with llmopt's C kernels (CPU, fp32 cache)."""

from __future__ import annotations

import ctypes

import torch

from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.attention_metadata import DecodeBatch

MAX_GROUP_DIM = 4096  # (query heads per KV head) x head_dim the native kernel holds (MAX_GD)


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
        # nothing: its eight ops still cost more than this one call up to about 1,024 keys.
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
