"""Attention over the paged KV cache with llmopt's C kernels (CPU), reading every cache
element type in place (kernels/kv_types.h)."""

from __future__ import annotations

import ctypes

import torch

from llmopt.layers.attention_backend import TorchAttention
from llmopt.layers.attention_metadata import DecodeBatch
from llmopt.layers.kv_cache import LayerKV

MAX_GROUP_DIM = 4096  # (query heads per KV head) x head_dim the native kernel holds (MAX_GD)
MAX_HEAD_DIM = 512  # rope_store.c's


class KVLayerStruct(ctypes.Structure):
    """kernels/kv_types.h's KVLayer: one layer's codes, scales and types."""

    _fields_ = [
        ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("ks", ctypes.c_void_p), ("vs", ctypes.c_void_p),
        ("kt", ctypes.c_int), ("vt", ctypes.c_int),
    ]  # fmt: skip

    @classmethod
    def of(cls, kv: LayerKV) -> KVLayerStruct:
        ptr = [None if t is None else t.data_ptr() for t in (kv.k_scale, kv.v_scale)]
        return cls(kv.k.data_ptr(), kv.v.data_ptr(), *ptr, kv.k_type.code, kv.v_type.code)


class NativeCpuAttention(TorchAttention):
    """TorchAttention with decode reading the paged cache in place (llmopt/kernels/
    paged_decode.c) instead of gathering each sequence's keys and values into a copy,
    rotary + cache store in one call (rope_store.c), and, on CPUs with AVX-512, every
    prefill chunk of a step in one call that also reads the cache in place
    (paged_prefill.c). For a CPU cache of any element type, attention in fp32; build it
    with `NativeCpuAttention.load()`."""

    def __init__(self, decode, rope, prefill=None) -> None:  # the C functions, declared
        self.fn, self.rope, self.prefill = decode, rope, prefill

    @classmethod
    def load(cls, avx2: bool = False) -> NativeCpuAttention | None:
        """The kernels, or None without a C compiler; avx2: a decode build that keeps to
        the AVX2 loops where the CPU has AVX-512 (for testing them)."""
        from llmopt.kernels.build import function

        ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
        # q, kv, slots, lens; B, L, H, KV, D; scale; out
        defines = ("LLMOPT_ATTN_AVX2",) if avx2 else ()
        decode = function(
            "paged_decode", [ptr] * 4 + [i32] * 5 + [ctypes.c_float, ptr], defines=defines
        )
        # qkv, row, cos, sin, bf16, N, H, KV, D, kv, slots, q_out
        rope = function("rope_store", [ptr, i64, ptr, ptr] + [i32] * 5 + [ptr] * 3)
        # q, kv, slots, chunks; n_chunks, H, KV, D; scale; out -> 0, or -1 unsupported
        prefill = function("paged_prefill", [ptr] * 4 + [i32] * 4 + [ctypes.c_float, ptr], i32)
        if prefill is not None and prefill(None, None, None, None, 0, 1, 1, 64, 1.0, None):
            prefill = None  # built without AVX-512: torch's flash kernel instead
        return None if decode is None or rope is None else cls(decode, rope, prefill)

    def attend(self, q, kv, meta, scale, window) -> torch.Tensor:
        if (
            not meta.prefills
            or self.prefill is None
            or not all(c.sees_all(window) for c in meta.prefills)  # it masks causally only
            or self.prefill_dtype is not None  # bf16 on AMX: torch's kernel on tiles
            or q.shape[2] % 64
        ):
            return super().attend(q, kv, meta, scale, window)
        q = q.float().contiguous()
        out = torch.empty_like(q)
        if meta.decode is not None:
            b = meta.num_decode
            out[:b] = self._decode(q[:b], kv, meta.decode, scale)
        slots, chunks = meta.prefill_layout()
        self.prefill(
            q.data_ptr(), ctypes.byref(KVLayerStruct.of(kv)), slots.data_ptr(),
            chunks.data_ptr(), len(meta.prefills), q.shape[1], kv.num_kv_heads, q.shape[2],
            scale, out.data_ptr(),
        )  # fmt: skip
        return out

    def rope_and_store(self, qkv, cos, sin, kv, meta, num_heads) -> torch.Tensor:
        if (
            qkv.dtype not in (torch.float32, torch.bfloat16)
            or qkv.stride(1) != 1
            or not (cos.is_contiguous() and sin.is_contiguous() and cos.dtype == qkv.dtype)
            or kv.head_dim > MAX_HEAD_DIM
        ):
            return super().rope_and_store(qkv, cos, sin, kv, meta, num_heads)
        n = qkv.shape[0]
        q = torch.empty(n, num_heads, kv.head_dim)
        self.rope(
            qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
            int(qkv.dtype == torch.bfloat16), n, num_heads, kv.num_kv_heads, kv.head_dim,
            ctypes.byref(KVLayerStruct.of(kv)), meta.slot_mapping.data_ptr(), q.data_ptr(),
        )  # fmt: skip
        return q

    def _decode(self, q, kv: LayerKV, d: DecodeBatch, scale: float) -> torch.Tensor:
        b, h, dim = q.shape
        # Also for one sequence in consecutive slots, where torch reads views and copies
        # nothing: its eight ops still cost more than this one call up to about 1,024 keys.
        if h // kv.num_kv_heads * dim > MAX_GROUP_DIM:  # a head group too wide for it
            return super()._decode(q, kv, d, scale)
        q = q.float().contiguous()
        out = torch.empty_like(q)
        self.fn(
            q.data_ptr(), ctypes.byref(KVLayerStruct.of(kv)), d.slots.data_ptr(),
            d.lens.data_ptr(), b, d.slots.shape[1], h, kv.num_kv_heads, dim, scale,
            out.data_ptr(),
        )  # fmt: skip
        return out
