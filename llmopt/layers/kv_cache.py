"""The paged KV cache: keys and values of every layer in fixed-size blocks. Which
blocks belong to which sequence is the block manager's business (engine/)."""

from __future__ import annotations

import torch


def kv_dtype_for(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # On the CPU, attention runs in fp32: small bf16/fp16 batched matmuls take a slow
    # path there (4x slower for one decode step on AVX2).
    return torch.float32 if device.type == "cpu" else model_dtype


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
