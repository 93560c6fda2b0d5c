"""The decode step's decoder blocks in one native call (kernels/decode_layers.c).

At decode a Llama block is about thirty small operations; run from Python, their
dispatch costs more than reading a small model's weights. `NativeDecoder` hands the
whole stack of blocks to one C function that runs the same kernels the Python path
calls (RMSNorm, the int4/int8/bf16 one-row linears, rotary + KV store, paged
attention, the gate's activation), with the same rounding. `LlamaForCausalLM` uses it
for steps that only decode (at most `max_rows` sequences) when `build` accepts the
model: a CPU KV cache (of any element type), every block linear either a bf16 weight
or a quantized one with the qgemv kernel. It takes Llama's blocks and their variants:
q/k norms (Qwen3, Gemma 3), norms of the attention's and the MLP's outputs and a GELU
gate (Gemma 3), and layers with different windows and rotary tables (Gemma 3's local
and global ones), each reading its own view of the step.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from llmopt.layers.attention_metadata import AttentionMetadata
from llmopt.layers.kv_cache import PagedKVCache
from llmopt.layers.linear import Linear
from llmopt.layers.native_attention import MAX_GROUP_DIM, MAX_HEAD_DIM, KVLayerStruct
from llmopt.layers.quant_linear import QuantLinear

if TYPE_CHECKING:
    from llmopt.models.llama import LlamaForCausalLM

# Sequences per step. With bf16 dense weights, past this the Python path catches up
# (it widens the weights to fp32 for a GEMM from 6 rows on, and its per-op dispatch no
# longer weighs against that many rows). Quantized linears run the same qgemv kernel on
# either path, so there the native step has no limit short of a prefill-sized batch.
DENSE_MAX_ROWS = 32
QUANT_MAX_ROWS = 256
_ptr, _i32 = ctypes.c_void_p, ctypes.c_int


class _DLinear(ctypes.Structure):
    _fields_ = [
        ("bits", _i32), ("w", _ptr), ("scale", _ptr), ("offset", _ptr), ("group", _i32),
        ("meta", _i32), ("codebook", _i32), ("bias", _ptr), ("perm", _ptr),
        ("N", _i32), ("K", _i32),
    ]  # fmt: skip


class _DLayer(ctypes.Structure):
    _fields_ = [
        ("norm1", _ptr), ("norm2", _ptr),
        ("qkv", _DLinear), ("o", _DLinear), ("gate_up", _DLinear), ("down", _DLinear),
        ("q_norm", _ptr), ("k_norm", _ptr), ("attn_out_norm", _ptr), ("mlp_out_norm", _ptr),
        ("gelu", _i32), ("view", _i32),
    ]  # fmt: skip


class _DView(ctypes.Structure):
    _fields_ = [
        ("cos", _ptr), ("sin", _ptr), ("slots", _ptr), ("lens", _ptr), ("L", _i32),
    ]  # fmt: skip


def _linear(m: torch.nn.Module, keep: list[torch.Tensor]) -> _DLinear | None:
    """The C description of one linear, or None if no native kernel takes it."""
    perm = None
    if isinstance(m, QuantLinear):
        if m.kernel != "qgemv":
            return None
        bias, perm = m.kernel_bias, m.perm
        w, bits, scale, offset, group, meta, codebook = m.operands.pointers()
        args = (bits, w, scale, offset, group, meta, codebook)
    elif isinstance(m, Linear):
        w = m.weight
        if m.packed is not None or w.dtype != torch.bfloat16 or w.shape[1] % 8:
            return None  # gemv_bf16.c: bf16 rows of a multiple of 8
        bias = None if m.bias is None else m.bias.float().contiguous()
        args = (16, m.weight.data_ptr(), None, None, 0, 0, 0)
    else:
        return None
    if perm is not None:
        perm = perm.to(torch.int64).contiguous()
        keep.append(perm)
    if bias is not None:
        keep.append(bias)
    n, k = m.out_features, m.in_features
    ptrs = (None if t is None else t.data_ptr() for t in (bias, perm))
    return _DLinear(*args, *ptrs, n, k)


# layers, n_layers, x, residual; M, E, H, KV, D, I; eps, bf16, views, kv (one KVLayer
# a layer); write_slots, scale
_ARGTYPES = (
    [_ptr, _i32, _ptr, _ptr] + [_i32] * 6 + [ctypes.c_float, _i32, _ptr, _ptr]
    + [_ptr, ctypes.c_float, _i32]
)  # fmt: skip


class NativeDecoder:
    def __init__(self, fn, model: LlamaForCausalLM, cache: PagedKVCache) -> None:
        self.fn = fn  # decode_layers
        cfg = model.config
        self.dims = (
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.intermediate_size,
        )  # fmt: skip
        self.eps = cfg.rms_norm_eps
        self.scale = model.layers[0].self_attn.scale
        self.keep: list[torch.Tensor] = []  # tensors whose pointers the table holds
        self.max_rows = QUANT_MAX_ROWS  # most sequences a step it runs (see build)
        self.layers = (_DLayer * cfg.num_layers)()
        self.windows: list[int | None] = []  # the layers' distinct windows: one view each
        self.first_layer: list[int] = []  # per view, a layer of it (whose rotary it reads)
        self.cache = cache  # the cache whose pointers `kv` holds
        self.kv = (KVLayerStruct * cfg.num_layers)(*map(KVLayerStruct.of, cache.layers))

    @classmethod
    def build(cls, model: LlamaForCausalLM, cache: PagedKVCache) -> NativeDecoder | None:
        """The native stack for this model and cache, or None where it does not apply."""
        cfg = model.config
        dtype = model.norm.weight.dtype  # the activations' (the table may be quantized)
        if (
            cache.device.type != "cpu"
            or cfg.head_dim > MAX_HEAD_DIM
            or dtype not in (torch.float32, torch.bfloat16)
            or cfg.num_heads // cfg.num_kv_heads * cfg.head_dim > MAX_GROUP_DIM
        ):
            return None
        from llmopt.kernels.build import function

        fn = function("decode_layers", _ARGTYPES, _i32)
        if fn is None:
            return None
        native = cls(fn, model, cache)
        for i, block in enumerate(model.layers):
            attn = block.self_attn
            norms = [n.weight for n in block.native_norms() if n is not None]
            if attn.q_norm is not None:
                norms += [attn.q_norm.weight, attn.k_norm.weight]
            linears = [
                _linear(m, native.keep)
                for m in (attn.qkv_proj, attn.o_proj, block.mlp.gate_up_proj, block.mlp.down_proj)
            ]
            if any(n.dtype != dtype for n in norms) or any(lin is None for lin in linears):
                return None
            if attn.window not in native.windows:
                native.windows.append(attn.window)
                native.first_layer.append(i)
            native.layers[i] = _DLayer(
                *(_pointer(n) for n in block.native_norms()[:2]), *linears,
                _pointer(attn.q_norm), _pointer(attn.k_norm),
                *(_pointer(n) for n in block.native_norms()[2:]),
                int(block.mlp.gelu), native.windows.index(attn.window),
            )  # fmt: skip
            if any(lin.bits == 16 for lin in linears):  # type: ignore[union-attr]
                native.max_rows = DENSE_MAX_ROWS
            native.keep += norms
        return native

    def __call__(
        self,
        x: torch.Tensor,  # (M, hidden): the new tokens' embeddings, overwritten
        rope: list[tuple[torch.Tensor, torch.Tensor]],  # each layer's (cos, sin), (M, D)
        meta: AttentionMetadata,
        residual: torch.Tensor | None = None,  # (M, hidden): the stream x adds into
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every block over the cache it was built for; returns (last block's MLP
        output, residual stream before it). The layers of one window share one rotary
        table (Gemma 3's local and global kinds). With `residual` (overwritten), x is
        the output of a previous block (a pipeline stage's), added into it by the
        first block's norm."""
        assert meta.decode is not None and x.is_contiguous()
        views = (_DView * len(self.windows))()
        keep = []  # the views' tensors, alive for the call
        for v, (window, first) in enumerate(zip(self.windows, self.first_layer, strict=True)):
            d = meta.for_window(window).decode
            assert d is not None
            cos, sin = rope[first]
            views[v] = _DView(cos.data_ptr(), sin.data_ptr(), d.slots.data_ptr(),
                              d.lens.data_ptr(), d.slots.shape[1])  # fmt: skip
            keep.append(d)
        continues = residual is not None
        if residual is None:
            residual = torch.empty_like(x)
        assert residual.is_contiguous()
        rc = self.fn(
            ctypes.addressof(self.layers), len(self.layers), x.data_ptr(), residual.data_ptr(),
            x.shape[0], *self.dims, self.eps, int(x.dtype == torch.bfloat16),
            ctypes.addressof(views), ctypes.addressof(self.kv), meta.slot_mapping.data_ptr(),
            self.scale, int(continues),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError("the native decode step refused its inputs")
        return x, residual


def _pointer(m: torch.nn.Module | None) -> int | None:
    """A norm's weight pointer, or None (NULL) for a norm the block does not have."""
    return None if m is None else m.weight.data_ptr()
