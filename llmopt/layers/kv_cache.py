"""The paged KV cache: keys and values of every layer in fixed-size blocks, each half in
its own element type (layers/kv_types.py). Which blocks belong to which sequence is
the block manager's business (engine/)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.config import ModelConfig
from llmopt.layers.kv_types import SCALE_DTYPE, KVType, resolve_kv_types


def kv_dtype_for(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The type attention computes in over the cache."""
    # On the CPU, attention runs in fp32: small bf16/fp16 batched matmuls take a slow
    # path there (4x slower for one decode step on AVX2).
    return torch.float32 if device.type == "cpu" else model_dtype


@dataclass(frozen=True)
class LayerKV:
    """One layer's slots. k, v: (S, KV, D) codes; k_scale, v_scale: (S, KV) bf16 for
    scaled types, else None. `dtype` is what attention computes in: `keys` and
    `values` hand rows back in it."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    k_type: KVType
    v_type: KVType
    dtype: torch.dtype

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[2]

    def store(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the new tokens' keys and values, k/v: (N, KV, D), into their slots."""
        for codes, scales, kind, x in (
            (self.k, self.k_scale, self.k_type, k),
            (self.v, self.v_scale, self.v_type, v),
        ):
            c, s = kind.quantize(x)
            if c.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernel: copy bytes
                codes, c = codes.view(torch.uint8), c.view(torch.uint8)
            codes.index_copy_(0, slots, c)
            if scales is not None:
                scales.index_copy_(0, slots, s)

    def keys(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The keys of the slots `index` (a tensor of slots, or a slice of them):
        (n, KV, D) in `dtype`; a view of the cache where nothing needs converting."""
        return self._read(self.k, self.k_scale, self.k_type, index)

    def values(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self._read(self.v, self.v_scale, self.v_type, index)

    def _read(self, codes, scales, kind: KVType, index) -> torch.Tensor:
        rows = codes[index]
        if scales is None and rows.dtype == self.dtype:
            return rows
        return kind.dequantize(rows, None if scales is None else scales[index], self.dtype)


def _layer(scales: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if scales is None else scales[i]


class PagedKVCache:
    """Keys and values of every layer in fixed-size blocks.

    k, v: (layers, num_blocks * block_size, KV, D) codes in k_type / v_type's storage;
    k_scale, v_scale: (layers, S, KV) bf16 for scaled types, else None. Slot s of layer
    i is k[i, s]; `layers[i]` is that layer's view.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        k_type: KVType,
        v_type: KVType,
        dtype: torch.dtype,  # what attention computes in (kv_dtype_for)
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.k_type, self.v_type = k_type, v_type
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        # Uninitialised: a slot is only ever read after its key/value was written
        # (decode padding repeats a sequence's own first slot), and untouched pages of
        # a large CPU cache then cost no memory.
        self.k = torch.empty(shape, dtype=k_type.storage, device=device)
        self.v = torch.empty(shape, dtype=v_type.storage, device=device)
        self.k_scale = self._scales(shape, k_type, device)
        self.v_scale = self._scales(shape, v_type, device)
        scales = [(_layer(self.k_scale, i), _layer(self.v_scale, i)) for i in range(num_layers)]
        self.layers = [
            LayerKV(self.k[i], self.v[i], ks, vs, k_type, v_type, dtype)
            for i, (ks, vs) in enumerate(scales)
        ]

    @classmethod
    def for_model(
        cls,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        model_dtype: torch.dtype,
        device: torch.device,
        kv_types: tuple[str, str] = ("auto", "auto"),
    ) -> PagedKVCache:
        """A cache for a model, its halves of the types named by kv_types (K, V)."""
        k_type, v_type = resolve_kv_types(kv_types, model_dtype, device)
        return cls(
            cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
            k_type, v_type, kv_dtype_for(model_dtype, device), device,
        )  # fmt: skip

    @staticmethod
    def _scales(shape, kind: KVType, device: torch.device) -> torch.Tensor | None:
        return torch.empty(shape[:3], dtype=SCALE_DTYPE, device=device) if kind.scaled else None

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, k_type: KVType, v_type: KVType
    ) -> int:
        per_head = k_type.bytes_per_row(head_dim) + v_type.bytes_per_row(head_dim)
        return num_layers * num_kv_heads * per_head

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.k, self.v, self.k_scale, self.v_scale)
            if t is not None
        )

    def describe(self) -> str:
        """Its element types and size, for start-up reports: "int8, 0.50 GB"."""
        k, v = self.k_type.name, self.v_type.name
        types = k if k == v else f"K {k}, V {v}"
        return f"{types}, {self.nbytes / 1e9:.2f} GB"

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1] // self.block_size

    @property
    def num_tokens(self) -> int:
        """Tokens the cache holds."""
        return self.k.shape[1]

    @property
    def device(self) -> torch.device:
        return self.k.device
