"""The native CPU attention kernels against the torch backend: decode reads the paged
cache in place and agrees with gather-then-matmul; rotary + KV store agrees with the
torch ops."""

from __future__ import annotations

import pytest
import torch

from llmopt.layers.attention_backend import (
    AttentionMetadata,
    DecodeBatch,
    NativeCpuAttention,
    TorchAttention,
)
from llmopt.layers.rotary import RotaryEmbedding


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("lens", [[37, 5, 120, 1], [300], [390, 3]])  # the last two: split-K
@pytest.mark.parametrize("dim", [64, 128, 40])  # AVX2 value loops for 64 and 128; 40 generic
def test_native_decode_matches_torch(heads, kv_heads, lens, dim) -> None:
    native = NativeCpuAttention.load()
    assert native is not None, "the kernel should build where a C compiler exists"
    torch.manual_seed(0)
    slots_total = 400
    k = torch.randn(slots_total, kv_heads, dim)
    v = torch.randn(slots_total, kv_heads, dim)
    q = torch.randn(len(lens), heads, dim)
    longest = max(lens)
    # Each sequence's keys scattered over the cache in a random order of slots.
    rows = [torch.randperm(slots_total)[:n] for n in lens]
    padded = torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in rows])
    lengths = torch.tensor(lens)
    valid = torch.arange(longest)[None, :] < lengths[:, None]
    batch = DecodeBatch(padded, lengths, valid)
    expected = TorchAttention()._decode(q, k, v, batch, 0.125)
    got = native._decode(q, k, v, batch, 0.125)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rope_and_store_matches_torch(dtype) -> None:
    """Rotary + KV store in one native call: bit-identical to the torch ops in bf16 (the
    rounding of every product is part of the model), to fp32 rounding in fp32."""
    native = NativeCpuAttention.load()
    assert native is not None
    torch.manual_seed(1)
    heads, kv_heads, dim, n = 9, 3, 64, 5
    rotary = RotaryEmbedding(dim, 10000.0, None, 64)
    cos, sin = rotary(torch.tensor([0, 3, 4, 17, 40]), dtype)
    # A row of qkv wider than its heads (a view into a bigger buffer), as a fused
    # projection with padding would give.
    wide = (torch.randn(n, (heads + 2 * kv_heads) * dim + 8) * 4).to(dtype)
    qkv = wide[:, : (heads + 2 * kv_heads) * dim]
    meta = AttentionMetadata(torch.tensor([7, 1, 30, 9, 2]))
    results = []
    for backend in (TorchAttention(), native):
        k, v = torch.zeros(32, kv_heads, dim), torch.zeros(32, kv_heads, dim)
        q = backend.rope_and_store(qkv, cos, sin, k, v, meta, heads)
        results.append((q.float(), k, v))
    tol = 0 if dtype == torch.bfloat16 else 1e-5
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
